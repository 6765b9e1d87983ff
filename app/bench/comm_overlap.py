"""`python -m app.bench comm --part overlap`: the overlapping step pipeline and the ResNet.

(a) comm.overlap off against on (comm.micro_batches=--micro-batches), dense and sparse backbone
    gradients, at each of --ranks: median step_time_s, comm_time_s (communication's time in
    flight), exposed_comm_s (the part the step waited for) and compute_s over the metrics
    intervals after --skip-steps, each the median over --repeats runs; the final loss of each
    run (overlap reorders work, not arithmetic: the same loss either way). The demo config
    (MLP, full softmax) on the 2k-class synthetic vectors of part `bytes`.
(b) dense against sparse backbone gradients with the ResNet of configs/images.yaml on synthetic
    images (`data_prep.synthetic --kind images`) at --image-ranks ranks: median step time and
    top-1 / top-5 over all classes after the same --image-steps steps.

Every run is one `app.train` job under mpirun; the runs of (a) interleave off and on, so a
change of the shared host's load falls on both alike.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from app.bench import launch
from app.bench.results import bench_command, host_load, write_result

TIMERS = ("step_time_s", "comm_time_s", "exposed_comm_s", "compute_s")


def arguments(c) -> None:
    c.add_argument("--micro-batches", type=int, default=2, help="(overlap) comm.micro_batches")
    c.add_argument("--repeats", type=int, default=3, help="(overlap) runs per configuration")
    c.add_argument("--image-classes", type=int, default=100)
    c.add_argument("--image-per-class", type=int, default=30)
    c.add_argument("--image-size", type=int, default=32)
    c.add_argument("--image-steps", type=int, default=150)
    c.add_argument("--image-ranks", type=int, default=2)
    c.add_argument("--image-config", default="configs/images.yaml")


def _train(args, name: str, ranks: int, config: str, sets: list[str]) -> dict | None:
    """One app.train job: its metrics intervals after --skip-steps and its summary."""
    out = Path(args.runs) / name
    lines = launch.train_job(ranks, config, out, ["train.checkpoint_every=0",
                                                  f"train.log_every={args.log_every}", *sets])
    if lines is None:
        return None
    kept = [m for m in lines if m["step"] > args.skip_steps]
    summary = json.loads((out / "summary.json").read_text())
    return {**{t: float(np.median([m[t] for m in kept])) for t in TIMERS},
            "final_loss": lines[-1]["loss"], "top1": summary["top1"], "top5": summary["top5"]}


def overlap_runs(args, data: Path, variant_sets) -> list[dict] | None:
    """(a): per (ranks, gradients, overlap) the medians over --repeats runs."""
    out = []
    for ranks in args.ranks:
        for gradients in ("dense", "sparse"):
            runs = {False: [], True: []}
            for repeat in range(args.repeats):
                for overlap in (False, True):
                    sets = [f"data.path={data}", f"train.steps={args.steps}",
                            f"train.batch_size={args.batch}",
                            f"train.eval_max_samples={args.eval_samples}",
                            *variant_sets(args, gradients)]
                    if overlap:
                        sets += ["comm.overlap=true", f"comm.micro_batches={args.micro_batches}"]
                    name = f"overlap-{gradients}-{'on' if overlap else 'off'}-np{ranks}-{repeat}"
                    entry = _train(args, name, ranks, args.config, sets)
                    if entry is None:
                        return None
                    runs[overlap].append(entry)
            for overlap, entries in runs.items():
                row = {"ranks": ranks, "gradients": gradients, "overlap": overlap,
                       "micro_batches": args.micro_batches if overlap else 1,
                       "repeats": len(entries),
                       **{t: float(np.median([e[t] for e in entries])) for t in TIMERS},
                       "runs": entries}
                out.append(row)
                print(f"np={ranks} {gradients} overlap={overlap}: step "
                      f"{row['step_time_s']:.3f}s, comm {row['comm_time_s']:.3f}s, exposed "
                      f"{row['exposed_comm_s']:.3f}s", flush=True)
    return out


def image_runs(args, variant_sets) -> list[dict] | None:
    """(b): dense and sparse gradients with the ResNet on synthetic images."""
    data = Path(f"{args.data}-images-{args.image_classes}")
    launch.synthetic_data(data, args.image_classes, args.image_per_class, 5,
                          ["--kind", "images", "--image-size", str(args.image_size)])
    out = []
    for variant in ("dense", "sparse"):
        sets = [f"data.path={data}", f"train.steps={args.image_steps}",
                f"train.eval_max_samples={args.eval_samples}", *variant_sets(args, variant)]
        entry = _train(args, f"images-{variant}-np{args.image_ranks}", args.image_ranks,
                       args.image_config, sets)
        if entry is None:
            return None
        out.append({"variant": variant, "ranks": args.image_ranks, "sets": sets[1:], **entry})
        print(f"images {variant}: step {entry['step_time_s']:.3f}s, top-1 {entry['top1']:.4f}",
              flush=True)
    return out


def run(args, data: Path, variant_sets) -> int:
    overlap = overlap_runs(args, data, variant_sets)
    if overlap is None:
        return 1
    images = image_runs(args, variant_sets)
    if images is None:
        return 1
    write_result(args.results, args.name or "comm_overlap", bench_command(args.argv),
                 {"classes": args.classes, "steps": args.steps, "batch_per_rank": args.batch,
                  "skip_steps": args.skip_steps, "sparse_ratio": args.ratio,
                  "sparse_warmup_steps": args.warmup, "micro_batches": args.micro_batches,
                  "host": host_load(), "overlap": overlap,
                  "images": {"classes": args.image_classes, "per_class": args.image_per_class,
                             "image_size": args.image_size, "steps": args.image_steps,
                             "config": args.image_config, "results": images}}, plot)
    return 0


def plot(plt, result):
    """Left: step time split into compute and exposed communication, with communication's
    time in flight beside it, per (ranks, gradients, overlap). Right: the ResNet runs."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 1]})
    rows = result["overlap"]
    labels = [f"np={r['ranks']}\n{r['gradients']}\n{'on' if r['overlap'] else 'off'}"
              for r in rows]
    x = np.arange(len(rows))
    compute = np.array([r["compute_s"] for r in rows])
    exposed = np.array([r["exposed_comm_s"] for r in rows])
    left.bar(x - 0.2, compute, 0.4, label="compute_s")
    left.bar(x - 0.2, exposed, 0.4, bottom=compute, label="exposed_comm_s")
    left.bar(x + 0.2, [r["comm_time_s"] for r in rows], 0.4, label="comm_time_s (in flight)")
    left.set_xticks(x, labels, fontsize=8)
    left.set_ylabel("seconds per step (median)")
    left.set_title(f"overlap off/on (micro-batches {result['micro_batches']}), "
                   f"C={result['classes']}, b={result['batch_per_rank']}/rank")
    left.legend(fontsize=8)
    images = result["images"]["results"]
    names = [r["variant"] for r in images]
    right.bar(names, [r["top1"] for r in images], color=["C0", "C1"])
    for i, r in enumerate(images):
        right.text(i, r["top1"], f"{r['top1']:.3f}\n{r['step_time_s']:.2f} s/step",
                   ha="center", va="bottom", fontsize=8)
    right.set_ylabel("top-1 after the same steps")
    right.set_title(f"ResNet, {result['images']['classes']} image classes, "
                    f"{result['images']['steps']} steps", fontsize=9)
    return fig
