"""`python -m app.bench SUBCOMMAND`: benchmarks whose results go to docs/results/ as JSON (with
the exact command that produced them) and a PNG.

  step      samples/s, step time against the backbone alone, and peak memory per rank of the
            softmax modes at several class counts (each class count one mpirun job; the modes
            and the backbone alone are timed in the same processes, median of --repeats)
  accuracy  top-1 over all classes of full / sampled / knn (several K and random negatives) on
            the structured synthetic data at equal steps (each configuration one training run)
  graph     KNN graph build time and recall@K (app/bench_graph.py)

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


def write_result(name: str, result: dict, plot) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"command": "python -m app.bench " + " ".join(map(shlex.quote, sys.argv[1:])),
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
    write_result(args.name, {"runs": runs, "summary": summary}, _plot_step)
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
                             "results": results}, _plot_accuracy)
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


def main(argv=None) -> int:
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
    args = p.parse_args(argv)
    if args.what == "step":
        return bench_step(args)
    if args.what == "accuracy":
        return bench_accuracy(args)
    from app import bench_graph  # noqa: PLC0415

    return bench_graph.main(args.rest)


if __name__ == "__main__":
    sys.exit(main())
