"""`python -m app.bench SUBCOMMAND`: benchmarks whose results go to docs/results/ as JSON (with
the exact command that produced them) and a PNG.

  step      samples/s, step time against the backbone alone, and peak memory per rank of the
            softmax modes at several class counts (each class count one mpirun job; the modes
            and the backbone alone are timed in the same processes, median of --repeats)
  accuracy  top-1 over all classes of full / sampled / knn (several K and random negatives) on
            the structured synthetic data at equal steps (each configuration one training run)
  graph     KNN graph build time and recall@K (app/bench_graph.py)
  knn       the KNN softmax benchmark: runs the parts above with the settings the KNN softmax
            is judged by (--parts; none = only the summary), then checks its targets against
            their newest results and writes knn_targets.json / .png

Benchmarks measure speed; tests check behaviour. Run them on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def mpirun(np_: int, *args: str) -> list[str]:
    return ["mpirun", "-np", str(np_), "--oversubscribe", sys.executable, *args]


def run_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMPI_ALLOW_RUN_AS_ROOT="1",
                OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def write_result(name: str, result: dict, plot, argv: list[str]) -> Path:
    """docs/results/NAME.json (with the command `python -m app.bench ARGV` that made it) and
    NAME.png drawn by `plot(plt, result)`."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"command": "python -m app.bench " + " ".join(map(shlex.quote, argv)),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig = plot(plt, result)
    fig.savefig(RESULTS / f"{name}.png", dpi=110, bbox_inches="tight")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return path


# -- step throughput ------------------------------------------------------------------------

def bench_step(args) -> int:
    runs = []
    for classes in args.classes:
        modes = [m for m in args.modes if not (m in ("full", "sampled") and classes > args.max_dense)]
        cmd = mpirun(args.np, "-m", "app.bench_step", "--classes", str(classes), "--modes", *modes,
                     "--batch", str(args.batch), "--dim", str(args.dim), "--k", str(args.k),
                     "--random-negatives", str(args.random_negatives), "--steps", str(args.steps),
                     "--repeats", str(args.repeats), "--sample-rate", str(args.sample_rate))
        print("running:", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            print(f"error: benchmark at C={classes} failed (exit {proc.returncode})",
                  file=sys.stderr)
            return 1
        run = json.loads(lines[-1][len("BENCH "):])
        runs.append(run)
        for mode, m in run["modes"].items():
            print(f"C={classes:>10} {mode:>8}: {m['samples_per_s']:9.0f} samples/s, "
                  f"{m['overhead_vs_backbone']:6.2f}x backbone step", flush=True)
    summary = _step_summary(runs)
    write_result(args.name, {"runs": runs, "summary": summary}, _plot_step, args.argv)
    for line in summary["lines"]:
        print(line)
    return 0


def _step_summary(runs) -> dict:
    lines, ratios = [], {}
    by_c = {r["classes"]: r["modes"] for r in runs}
    for c, modes in sorted(by_c.items()):
        if "knn" in modes and "full" in modes:
            ratio = modes["knn"]["samples_per_s"] / modes["full"]["samples_per_s"]
            ratios[f"knn_over_full_C{c}"] = ratio
            lines.append(f"C={c}: knn {ratio:.1f}x the samples/s of full")
    knn = {c: m["knn"]["samples_per_s"] for c, m in by_c.items() if "knn" in m}
    if len(knn) > 1:
        lo, hi = min(knn), max(knn)
        ratios[f"knn_C{hi}_over_C{lo}"] = knn[hi] / knn[lo]
        lines.append(f"knn at C={hi}: {knn[hi] / knn[lo]:.2f}x its speed at C={lo}")
    return {"ratios": ratios, "lines": lines}


def _plot_step(plt, result):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    modes = sorted({m for r in result["runs"] for m in r["modes"]})
    for mode in modes:
        pts = [(r["classes"], r["modes"][mode]) for r in result["runs"] if mode in r["modes"]]
        xs = [c for c, _ in pts]
        ax1.plot(xs, [m["samples_per_s"] for _, m in pts], "o-", label=mode)
        ax2.plot(xs, [m["overhead_vs_backbone"] for _, m in pts], "o-", label=mode)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("classes C")
        ax.legend()
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("samples/s (global)")
    ax2.set_ylabel("step time / backbone-only step time")
    ax2.axhline(1.0, color="gray", lw=0.8)
    r0 = result["runs"][0]
    fig.suptitle(f"training step, {r0['ranks']} ranks, batch {r0['batch_per_rank']}/rank, "
                 f"D={r0['dim']}, knn K={r0['k']}+{r0['random_negatives']}")
    return fig


# -- accuracy -------------------------------------------------------------------------------

def bench_accuracy(args) -> int:
    data = Path(args.data)
    if not (data / "dataset.json").exists():
        cmd = [sys.executable, "-m", "data_prep.synthetic", "--out", str(data), "--num-classes",
               str(args.classes), "--per-class", str(args.per_class), "--val-per-class", "2",
               "--dim", "128", "--seed", "0"]
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, env=run_env(), check=True)
    results = []
    for spec in args.configs:
        sets = [s for s in spec.split(",") if s]
        out = Path(args.runs) / spec.replace(",", "_").replace("=", "-").replace("softmax.", "")
        cmd = mpirun(args.np, "-m", "app.train", "--config", args.config,
                     "--set", f"data.path={data}", "--set", f"out_dir={out}",
                     "--set", f"train.steps={args.steps}", "--set", "train.checkpoint_every=0",
                     "--set", f"train.eval_max_samples={args.eval_samples}",
                     *[x for s in sets for x in ("--set", s)])
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        print("running:", " ".join(cmd), flush=True)
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        summary = json.loads((out / "summary.json").read_text())
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        entry = {"config": sets, "top1": summary["top1"], "top5": summary["top5"],
                 "wall_s": time.perf_counter() - started,
                 "median_samples_per_s": sorted(m["samples_per_s"] for m in metrics)[len(metrics) // 2],
                 "knn_build_s": sum(m.get("knn_build_s", 0.0) for m in metrics)}
        results.append(entry)
        print(f"{spec}: top-1 {entry['top1']:.4f} top-5 {entry['top5']:.4f} "
              f"({entry['wall_s']:.0f}s)", flush=True)
    write_result(args.name, {"classes": args.classes, "steps": args.steps, "ranks": args.np,
                             "results": results}, _plot_accuracy, args.argv)
    return 0


def _plot_accuracy(plt, result):
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(result["results"]) + 1.5))
    labels = [" ".join(r["config"]) or "default" for r in result["results"]]
    ax.barh(labels, [r["top1"] for r in result["results"]])
    for y, r in enumerate(result["results"]):
        ax.text(r["top1"], y, f" {r['top1']:.3f}", va="center")
    ax.set_xlabel("top-1 over all classes (val)")
    ax.invert_yaxis()
    ax.set_title(f"C={result['classes']}, {result['steps']} steps, {result['ranks']} ranks")
    return fig


# -- the KNN softmax benchmark and its targets ------------------------------------------------

KNN_PARTS = {
    "accuracy": ["accuracy", "--classes", "100000", "--steps", "1000", "--name", "accuracy_100k",
                 "--configs", "softmax.mode=full", "softmax.mode=sampled,softmax.sample_rate=0.00256",
                 # random rows, as these were measured before classifier_init=auto
                 "softmax.mode=knn,softmax.k=64,softmax.random_negatives=64,"
                 "model.classifier_init=random",
                 "softmax.mode=knn,softmax.k=128,softmax.random_negatives=128,"
                 "model.classifier_init=random",
                 "softmax.mode=knn,softmax.k=256,softmax.random_negatives=256,"
                 "model.classifier_init=random"],
    "accuracy-imprinted": [
        "accuracy", "--classes", "100000", "--steps", "1000", "--name", "accuracy_100k_imprinted",
        "--configs", "softmax.mode=full,model.classifier_init=centres",
        "softmax.mode=knn,softmax.k=128,softmax.random_negatives=128,model.classifier_init=centres",
        "softmax.mode=knn,softmax.k=256,softmax.random_negatives=256,model.classifier_init=centres"],
    "step": ["step", "--classes", "100000", "1000000", "10000000", "--steps", "3",
             "--repeats", "3"],
    "graph": ["graph", "--classes", "100000", "1000000"],
}


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _active(config: list[str]) -> int | None:
    """Active classes per sample of a knn configuration (K + R), from its --set overrides."""
    sets = dict(c.split("=", 1) for c in config)
    if sets.get("softmax.mode") != "knn":
        return None
    return int(sets.get("softmax.k", 64)) + int(sets.get("softmax.random_negatives", 0))


ACCURACY_RESULTS = ("accuracy_100k", "accuracy_100k_imprinted")


def _accuracy_targets(name: str, accuracy: dict) -> list[dict]:
    """knn (at most 512 active classes) against full and sampled of the same result file."""
    by_mode = {}
    for r in accuracy["results"]:
        mode = dict(c.split("=", 1) for c in r["config"])["softmax.mode"]
        by_mode.setdefault(mode, []).append(r)
    knn = [r for r in by_mode.get("knn", []) if (_active(r["config"]) or 0) <= 512]
    best = max(knn, key=lambda r: r["top1"], default=None)
    if best is None:
        return []
    out = []
    full = max((r["top1"] for r in by_mode.get("full", [])), default=None)
    if full is not None:
        out.append({"target": f"{name}: knn top-1 within 1 point of full or above",
                    "measured": f"knn {' '.join(best['config'][1:])}: {best['top1']:.4f}, "
                                f"full {full:.4f}",
                    "met": best["top1"] >= full - 0.01, "command": accuracy["command"]})
    sampled = max((r["top1"] for r in by_mode.get("sampled", [])), default=None)
    if sampled is not None:
        out.append({"target": f"{name}: knn far above sampled (at least 2x its top-1)",
                    "measured": f"knn {best['top1']:.4f}, sampled {sampled:.4f}",
                    "met": best["top1"] >= 2 * sampled, "command": accuracy["command"]})
    return out


def knn_targets(accuracies: dict, step: dict | None, graph: dict | None) -> list[dict]:
    """The KNN softmax targets, each checked against the newest result that measures it (None
    where that benchmark has not been run); the accuracy targets once per accuracy result
    (name -> result; knn against full and sampled of the same run set)."""
    out = []
    for name, accuracy in accuracies.items():
        out += _accuracy_targets(name, accuracy)
    if step:
        ratios = step["summary"]["ratios"]
        if "knn_over_full_C1000000" in ratios:
            r = ratios["knn_over_full_C1000000"]
            out.append({"target": "knn samples/s >= 20x full at C = 1M",
                        "measured": f"{r:.1f}x", "met": r >= 20, "command": step["command"]})
        if "knn_C10000000_over_C100000" in ratios:
            r = ratios["knn_C10000000_over_C100000"]
            out.append({"target": "knn at C = 10M >= 0.8x its speed at C = 100k",
                        "measured": f"{r:.2f}x", "met": r >= 0.8, "command": step["command"]})
    if graph:
        runs = [r for r in graph["runs"] if r["classes"] == 1_000_000 and r["setting"] == "auto"]
        if runs:
            r = runs[-1]
            t = graph["target"]
            out.append({"target": f"graph build at C = 1M <= {t['seconds']:.0f} s with "
                                  f"recall_at_k >= {t['recall_at_k']}",
                        "measured": f"{r['seconds']:.1f} s wall ({r['cpu_seconds']:.1f} CPU s), "
                                    f"recall {r['recall_at_k']:.3f}",
                        "met": bool(t["met"]), "command": graph["command"]})
    return out


def bench_knn(args) -> int:
    for part in args.parts:
        argv = KNN_PARTS[part]
        print("running: python -m app.bench", " ".join(argv), flush=True)
        if part == "graph":  # the graph benchmark runs under mpirun itself
            cmd = mpirun(args.np, "-m", "app.bench_graph", *argv[1:])
            rc = subprocess.run(cmd, cwd=ROOT, env=run_env()).returncode
        else:
            rc = main(argv)
        if rc != 0:
            print(f"error: the {part} part failed (exit {rc})", file=sys.stderr)
            return rc
    accuracies = {n: r for n in ACCURACY_RESULTS if (r := _load(n)) is not None}
    step, graph = _load("step_throughput"), _load("knn_graph")
    # The 1M build repeated (median of several) where that was run, else the settings sweep.
    graph_1m = _load("knn_graph_1m") or graph
    targets = knn_targets(accuracies, step, graph_1m)
    for t in targets:
        print(f"{'MET    ' if t['met'] else 'NOT MET'}  {t['target']}: {t['measured']}")
    missing = [n for n in (*ACCURACY_RESULTS, "step_throughput", "knn_graph")
               if n not in accuracies and _load(n) is None]
    if missing:
        print("no result yet for: " + ", ".join(missing) + " (run those parts)")
    write_result("knn_targets", {"targets": targets, "results": {
        "accuracy": accuracies, "step": step, "graph": graph}}, _plot_knn, args.argv)
    return 0


def _plot_knn(plt, result):
    """Three panels: top-1 of each mode at C = 100k, knn's samples/s over full's, and the graph
    build's recall against time at 1M with the target box."""
    res = result["results"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    rows = [r for acc in res["accuracy"].values() for r in acc["results"]]
    if rows:
        labels = [" ".join(c.replace("softmax.", "").replace("model.classifier_init=centres",
                                                              "imprinted") for c in r["config"])
                  for r in rows]
        ax.barh(labels, [r["top1"] for r in rows],
                color=["C1" if "mode=knn" in l else "C0" for l in labels])
        for y, r in enumerate(rows):
            ax.text(r["top1"], y, f" {r['top1']:.3f}", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        first = next(iter(res["accuracy"].values()))
        ax.set_xlabel(f"top-1, C={first['classes']:,}, {first['steps']} steps")
    ax.set_title("accuracy at equal steps")
    ax = axes[1]
    if res["step"]:
        runs = res["step"]["runs"]
        cs = [r["classes"] for r in runs]
        for mode in ("full", "sampled", "knn"):
            pts = [(r["classes"], r["modes"][mode]["samples_per_s"]) for r in runs
                   if mode in r["modes"]]
            ax.plot([c for c, _ in pts], [v for _, v in pts], "o-", label=mode)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(cs)
        ax.set_xlabel("classes C")
        ax.set_ylabel("samples/s (2 ranks)")
        ax.legend()
    ax.set_title("step throughput")
    ax = axes[2]
    if res["graph"]:
        for r in res["graph"]["runs"]:
            ax.scatter(r["seconds"], r["recall_at_k"], color="C2" if r["setting"] == "auto"
                       else "C7")
            ax.annotate(f"{r['setting']} {r['classes'] // 1000}k", (r["seconds"],
                        r["recall_at_k"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        t = res["graph"]["target"]
        ax.axhline(t["recall_at_k"], color="grey", ls="--", lw=0.8)
        ax.axvline(t["seconds"], color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: PLC0415

        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("build wall seconds")
        ax.set_ylabel("recall_at_k")
    ax.set_title("KNN graph build (target: 1M inside the dashed corner)")
    met = sum(t["met"] for t in result["targets"])
    fig.suptitle(f"KNN softmax: {met} of {len(result['targets'])} targets met")
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["graph"]:
        # argparse cannot hand options after a subcommand on as a remainder: pass them directly.
        from app import bench_graph  # noqa: PLC0415

        return bench_graph.main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m app.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("step", help="step throughput of the softmax modes")
    s.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    s.add_argument("--modes", nargs="+", default=["full", "sampled", "knn"])
    s.add_argument("--max-dense", type=int, default=1_000_000,
                   help="skip full/sampled above this many classes (memory, time)")
    s.add_argument("--np", type=int, default=2)
    s.add_argument("--batch", type=int, default=256)
    s.add_argument("--dim", type=int, default=128)
    s.add_argument("--k", type=int, default=64)
    s.add_argument("--random-negatives", type=int, default=64)
    s.add_argument("--sample-rate", type=float, default=0.1)
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--name", default="step_throughput")
    a = sub.add_parser("accuracy", help="top-1 of the softmax modes at equal steps")
    a.add_argument("--classes", type=int, default=100_000)
    a.add_argument("--per-class", type=int, default=10)
    a.add_argument("--data", default="data/bench-100k")
    a.add_argument("--runs", default="runs/bench-accuracy")
    a.add_argument("--config", default="configs/demo.yaml")
    a.add_argument("--steps", type=int, default=1000)
    a.add_argument("--eval-samples", type=int, default=20000)
    a.add_argument("--np", type=int, default=2)
    a.add_argument("--configs", nargs="+", default=[
        "softmax.mode=full", "softmax.mode=sampled,softmax.sample_rate=0.0026",
        "softmax.mode=knn,softmax.k=64,softmax.random_negatives=64"])
    a.add_argument("--name", default="accuracy_100k")
    g = sub.add_parser("graph", help="KNN graph build time and recall (app/bench_graph.py)")
    g.add_argument("rest", nargs=argparse.REMAINDER)
    k = sub.add_parser("knn", help="the KNN softmax benchmark: accuracy, step and graph parts, "
                                   "then its targets (knn_targets.json / .png)")
    k.add_argument("--parts", nargs="*", default=list(KNN_PARTS), choices=list(KNN_PARTS),
                   help="parts to run before the summary (default: all; none: only the "
                        "summary of the newest results)")
    k.add_argument("--np", type=int, default=2, help="ranks of the graph part (default: 2)")
    args = p.parse_args(argv)
    args.argv = argv
    if args.what == "knn":
        return bench_knn(args)
    if args.what == "step":
        return bench_step(args)
    if args.what == "accuracy":
        return bench_accuracy(args)
    from app import bench_graph  # noqa: PLC0415

    return bench_graph.main(args.rest)


if __name__ == "__main__":
    sys.exit(main())
