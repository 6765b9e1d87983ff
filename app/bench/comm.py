"""`python -m app.bench comm`: what one training step sends, by kind, with dense and sparse
backbone gradients, at --ranks ranks; step time and top-1 after the same steps; and a
projection of the step time to P = 8 ... 256 ranks on networks of each --bandwidth-gbps and
--latency-us (the alpha-beta model of app/bench/comm_model.py, whose docstring states every
formula).

Each (ranks, variant) is one training run of `app.train` under mpirun on --config (the demo:
MLP backbone, full softmax) over the synthetic data (`data_prep.synthetic`, made at --data where
it has none). Variants: `dense` (comm.gradients=dense, Horovod's allreduce), `sparse`
(comm.gradients=sparse at --ratio, residuals, comm.sparse_warmup_steps=--warmup) and
`sparse_mc` (the same with comm.momentum_correction=true). Per run: `bytes_by_kind` of rank 0
(metrics.jsonl, means over the intervals after --skip-steps), median `step_time_s` and
`comm_time_s` over those intervals, and top-1/top-5 over all classes at the end.

Projection inputs, from the runs at the fewest ranks: compute seconds per step = median
step_time_s - median comm_time_s of the dense run, the same for every variant (the sparse
selection's CPU time is left out: on a shared 2-core host it is within the noise of the
measured step times, which the result lists per run); the dense gradient bytes G = grad_bytes_sent x P / (2 (P-1)) of the dense run; the
small tensors' bytes S (backbone tensors under comm.dense_below entries, float32); the sparse
pair bytes per rank k_bytes = (grad_bytes_sent - 2 (P-1)/P S) / (P-1) of each sparse run.

`--reproject` runs nothing and recomputes the projection of the existing result with other
network arguments (recorded as `projection_command`).

`--part overlap` measures the rest (app/bench/comm_overlap.py, result `comm_overlap`): step
time and exposed communication with comm.overlap off and on, and dense against sparse
gradients with the ResNet on synthetic images.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from app.bench import comm_model, comm_overlap, launch
from app.bench.results import bench_command, host_load, load_result, write_result

KINDS = ("features", "labels", "logits", "feature_gradients", "backbone_gradients", "batchnorm",
         "other")
PROJECT_P = (8, 16, 32, 64, 128, 256)


def arguments(c) -> None:
    c.add_argument("--classes", type=int, default=2000)
    c.add_argument("--per-class", type=int, default=12)
    c.add_argument("--data", default="data/bench-comm-2k")
    c.add_argument("--runs", default="runs/bench-comm")
    c.add_argument("--config", default="configs/demo.yaml")
    c.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    c.add_argument("--variants", nargs="+", default=["dense", "sparse", "sparse_mc"],
                   choices=["dense", "sparse", "sparse_mc"])
    c.add_argument("--steps", type=int, default=200)
    c.add_argument("--batch", type=int, default=64, help="samples per rank")
    c.add_argument("--ratio", type=float, default=0.01, help="comm.sparse_ratio")
    c.add_argument("--warmup", type=int, default=20, help="comm.sparse_warmup_steps")
    c.add_argument("--log-every", type=int, default=10)
    c.add_argument("--skip-steps", type=int, default=30,
                   help="leave the intervals up to this step out of bytes and times")
    c.add_argument("--eval-samples", type=int, default=10000)
    c.add_argument("--bandwidth-gbps", type=float, nargs="+", default=[100.0, 10.0],
                   help="link bandwidths of the projection (one projection each)")
    c.add_argument("--latency-us", type=float, default=5.0)
    c.add_argument("--reproject", action="store_true",
                   help="run nothing: recompute the projection of the existing --name result "
                        "with these network arguments (its measurements and command kept)")
    c.add_argument("--name", default=None,
                   help="result name (default: comm, or comm_overlap with --part overlap)")
    c.add_argument("--part", choices=("bytes", "overlap"), default="bytes",
                   help="bytes: bytes by kind, dense/sparse, projection; overlap: "
                        "app/bench/comm_overlap.py")
    comm_overlap.arguments(c)



def variant_sets(args, variant: str) -> list[str]:
    if variant == "dense":
        return ["comm.gradients=dense"]
    out = ["comm.gradients=sparse", f"comm.sparse_ratio={args.ratio}",
           f"comm.sparse_warmup_steps={args.warmup}"]
    return out + (["comm.momentum_correction=true"] if variant == "sparse_mc" else [])


def _train(args, data: Path, ranks: int, variant: str) -> dict | None:
    out = Path(args.runs) / f"{variant}-np{ranks}"
    sets = [f"data.path={data}", f"train.steps={args.steps}",
            f"train.batch_size={args.batch}", f"train.log_every={args.log_every}",
            "train.checkpoint_every=0", f"train.eval_max_samples={args.eval_samples}",
            *variant_sets(args, variant)]
    lines = launch.train_job(ranks, args.config, out, sets)
    if lines is None:
        return None
    summary = json.loads((out / "summary.json").read_text())
    lines = [m for m in lines if m["step"] > args.skip_steps]
    by_kind = {k: float(np.mean([m["bytes_by_kind"].get(k, 0) for m in lines])) for k in KINDS}
    return {"ranks": ranks, "variant": variant, "sets": variant_sets(args, variant),
            "intervals": len(lines), "bytes_by_kind": by_kind,
            "bytes_sent": float(np.mean([m["bytes_sent"] for m in lines])),
            "grad_bytes_sent": float(np.mean([m["grad_bytes_sent"] for m in lines])),
            "median_step_s": float(np.median([m["step_time_s"] for m in lines])),
            "median_comm_s": float(np.median([m["comm_time_s"] for m in lines])),
            "top1": summary["top1"], "top5": summary["top5"], "final_loss": lines[-1]["loss"]}


def backbone_sizes(args) -> dict:
    """Float32 bytes of all backbone tensors and of those under comm.dense_below entries,
    the embedding dim and the batch-norm layers' channels of --config."""
    from torch import nn  # noqa: PLC0415 - heavy

    from app.backbones import build_backbone  # noqa: PLC0415
    from app.config import load_config  # noqa: PLC0415

    cfg = load_config(args.config, [])
    backbone = build_backbone(cfg.model, (128,))
    sizes = [p.numel() for p in backbone.parameters()]
    return {"grad_bytes": 4 * sum(sizes),
            "small_bytes": 4 * sum(n for n in sizes if n < cfg.comm.dense_below),
            "dim": cfg.model.embedding_dim,
            "bn_channels": [m.num_features for m in backbone.modules()
                            if isinstance(m, nn.modules.batchnorm._BatchNorm)]}


def projection(args, results: list[dict], batch: int) -> dict:
    """Projected step seconds per variant, network (bandwidth in Gb/s) and P in PROJECT_P,
    from the runs at the fewest ranks."""
    sizes = backbone_sizes(args)
    grad_bytes, small = sizes["grad_bytes"], sizes["small_bytes"]
    p0 = min(r["ranks"] for r in results)
    out = {"from_ranks": p0, **sizes, "latency_us": args.latency_us,
           "bandwidths_gbps": args.bandwidth_gbps, "variants": {}}
    base = [r for r in results if r["ranks"] == p0]
    dense = [r for r in base if r["variant"] == "dense"] or base
    compute = max(dense[0]["median_step_s"] - dense[0]["median_comm_s"], 0.0)
    out["compute_s"] = compute
    for r in base:
        pair_bytes = None
        if r["variant"] != "dense":
            dense_part = 2 * (p0 - 1) / p0 * small
            pair_bytes = (r["grad_bytes_sent"] - dense_part) / (p0 - 1)
        per_net = {}
        for gbps in args.bandwidth_gbps:
            net = comm_model.Network.of(gbps, args.latency_us)
            per_net[str(gbps)] = {str(p): comm_model.step_s(
                net, p, compute_s=compute, batch=batch, dim=sizes["dim"],
                grad_bytes=grad_bytes, pair_bytes=pair_bytes,
                small_bytes=small if pair_bytes is not None else 0.0,
                bn_channels=tuple(sizes["bn_channels"])) for p in PROJECT_P}
        out["variants"][r["variant"]] = {"pair_bytes": pair_bytes, "step_s": per_net}
    return out


def reproject(args) -> int:
    args.name = args.name or "comm"
    result = load_result(args.results, args.name)
    if result is None:
        print(f"error: {args.results}/{args.name}.json not found: run the benchmark first "
              f"(without --reproject)", file=sys.stderr)
        return 2
    command = result.pop("command")
    for key in ("date", "bandwidth_gbps", "latency_us"):  # the latter two: an older format
        result.pop(key, None)
    result["projection"] = projection(args, result["results"], result["batch_per_rank"])
    result["projection_command"] = bench_command(args.argv)
    write_result(args.results, args.name, command, result, plot)
    return 0


def run(args) -> int:
    if args.reproject:
        return reproject(args)
    data = Path(args.data)
    launch.synthetic_data(data, args.classes, args.per_class, 2)
    if args.part == "overlap":
        return comm_overlap.run(args, data, variant_sets)
    results = []
    for ranks in args.ranks:
        for variant in args.variants:
            entry = _train(args, data, ranks, variant)
            if entry is None:
                return 1
            results.append(entry)
            print(f"np={ranks} {variant}: {entry['bytes_sent']:.0f} B/step "
                  f"(gradients {entry['grad_bytes_sent']:.0f}), median step "
                  f"{entry['median_step_s']:.3f}s, top-1 {entry['top1']:.4f}", flush=True)
    write_result(args.results, args.name or "comm", bench_command(args.argv),
                 {"classes": args.classes, "steps": args.steps, "batch_per_rank": args.batch,
                  "sparse_ratio": args.ratio, "sparse_warmup_steps": args.warmup,
                  "overlap": "measured by --part overlap (result comm_overlap)",
                  "host": host_load(), "results": results,
                  "projection": projection(args, results, args.batch)}, plot)
    return 0


def plot(plt, result):
    """Left: bytes per step by kind (stacked), one bar per run. Right: projected step time."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    runs = result["results"]
    labels = [f"{r['variant']}\nnp={r['ranks']}" for r in runs]
    bottom = np.zeros(len(runs))
    for kind in KINDS:
        values = np.array([r["bytes_by_kind"].get(kind, 0) for r in runs]) / 1e6
        left.bar(labels, values, bottom=bottom, label=kind)
        bottom += values
    left.set_ylabel("MB sent per step by rank 0")
    left.set_title(f"C={result['classes']}, b={result['batch_per_rank']}/rank, "
                   f"ratio {result['sparse_ratio']}")
    left.legend(fontsize=8)
    proj = result["projection"]
    styles = ["-", "--", ":", "-."]
    for (variant, v), colour in zip(proj["variants"].items(), ["C0", "C1", "C2", "C3"]):
        for gbps, style in zip(proj["bandwidths_gbps"], styles):
            steps = v["step_s"][str(gbps)]
            ps = sorted(int(p) for p in steps)
            right.plot(ps, [steps[str(p)]["total"] for p in ps], marker="o", ls=style,
                       color=colour, label=f"{variant}, {gbps:g} Gb/s")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("ranks P")
    right.set_ylabel("projected step time (s)")
    right.set_title(f"alpha-beta projection, latency {proj['latency_us']} us "
                    f"(from np={proj['from_ranks']})")
    right.legend(fontsize=8)
    return fig
