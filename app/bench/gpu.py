"""`python -m app.bench gpu`: what one GPU holds and how fast it trains, in one process.

For each class count C (default 10^6, 10^7, 10^8) at D = 128 and batch 256: the samples/s of
`full` and `knn` (K = 64 graph neighbours + 64 random negatives) with a small real backbone (the
MLP over 128-d random vectors, or `--backbone resnet` on 64x64 random images) under
`train.precision=bf16`, the peak memory of each run against its classifier rows + optimizer
state + graph (the issue's target: at most 1.3x), the most classes that fit (an estimate from
the measured bytes per class and the device's memory), and, separately, the time of an exact
graph build (app/knn/torch_search.py's `local_topk`, the `torch` index's kernel) for the largest
C whose build fits `--build-budget-s`, with an extrapolation from a probe for the others.

The classifier rows are float32 (`train.rows_dtype=bf16` is not available in this version) with
float32 momentum. The knn runs use a RANDOM graph (`random_device_graph`: random neighbours, as
`knn.init=random`), because an exact graph of 10^8 classes does not fit the time; a step's cost
does not depend on which classes the graph names. Rows, graph and steps run in one process on
one device through `OneProcessClassifier` (app/bench/gpu_model.py: the one-rank path of the
project's classifier, tested equal to it): only torch, numpy and h5py are needed (no Horovod,
faiss, mpi4py or launcher; tests/unit/test_bench_gpu.py runs it with those imports blocked).
`--device cpu` with small C (`--classes 1e4 1e5`) is the quick CPU run of the same code; its
results are labelled `"device": "cpu"` and are not the target measurement. Without matplotlib
the PNG is left out.

Legend: N = batch, D = embedding dim, C = classes, K = graph neighbours.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

from app.backbones import build_backbone
from app.bench.gpu_model import OneProcessClassifier, random_device_graph, random_rows
from app.bench.results import RESULTS, bench_command
from app.config import ModelConfig, OptimConfig, SoftmaxConfig
from app.training.precision import PRECISIONS, backbone_features

# Of the device's memory, the share a run may plan to use (the rest: context, fragmentation).
USABLE = 0.95
TARGET_PEAK_RATIO = 1.3


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    p.add_argument("--modes", nargs="+", default=["full", "knn"], choices=["full", "knn"])
    p.add_argument("--device", default="auto", help="auto (the GPU if there is one), cuda, cpu")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--random-negatives", type=int, default=64)
    p.add_argument("--backbone", default="mlp", choices=["mlp", "resnet"],
                   help="mlp: 128-d vectors; resnet: 64x64 images")
    p.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--build-budget-s", type=float, default=90.0,
                   help="the longest exact graph build run (longer ones are extrapolated)")
    p.add_argument("--time-limit-s", type=float, default=420.0,
                   help="no new run starts after this many seconds")
    p.add_argument("--name", default=None, help="result name (default gpu_capacity, or "
                                                "gpu_cpu_smoke on the CPU)")
    p.add_argument("--results", type=Path, default=RESULTS)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_bytes(device) -> int:
    """GPU: the peak of allocated memory since the last reset. CPU: the process's peak
    resident memory since it started (ru_maxrss: not resettable, includes torch itself)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _memory_total(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def predicted_bytes(mode: str, classes: int, args) -> int:
    """What a run holds at its peak, by the arithmetic of its tensors. knn: rows and momentum
    (2 C D float32) and the graph (C K int32); full adds a normalised copy of the rows, the
    rows' gradient and a temporary of the update (3 C D) and the logits, their softmax and
    gradient (3 N C)."""
    rows = 4 * classes * args.dim
    if mode == "knn":
        return 2 * rows + 4 * classes * args.k
    return 5 * rows + 3 * 4 * args.batch * classes


def _backbone(args, device):
    """(backbone, a function giving batch number i's inputs) on `device`."""
    torch.manual_seed(0)
    if args.backbone == "mlp":
        cfg, shape = ModelConfig(embedding_dim=args.dim), (128,)
        batches = [torch.randn(args.batch, 128, device=device) for _ in range(4)]
    else:
        cfg, shape = ModelConfig(backbone="resnet", embedding_dim=args.dim), (64, 64, 3)
        batches = [torch.randint(0, 256, (args.batch, 64, 64, 3), dtype=torch.uint8,
                                 device=device) for _ in range(4)]
    model = build_backbone(cfg, shape).to(device)
    return model, lambda i: batches[i % len(batches)]


def _timed_steps(args, clf, backbone, inputs, device) -> dict:
    """Warm-up, then `args.steps` timed training steps (backbone forward under the precision,
    classifier loss, backward, both updates). Returns samples/s and the mean loss."""
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator(device=device).manual_seed(1)
    losses = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            _sync(device)
            started = time.perf_counter()
        labels = torch.randint(0, clf.num_classes, (args.batch,), device=device, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        feat = backbone_features(backbone, inputs(i), args.precision)
        loss = clf.loss(feat, labels, i)
        loss.backward()
        optimizer.step()
        clf.step(0.1)
        losses.append(loss.detach())
    _sync(device)
    seconds = time.perf_counter() - started
    return {"samples_per_s": args.batch * args.steps / seconds,
            "step_ms": 1000 * seconds / args.steps,
            "mean_loss": float(torch.stack(losses[args.warmup:]).mean())}


def _run(args, mode: str, classes: int, device) -> dict:
    """One (mode, C) run: allocate, train, measure; OOM is a result ("fits": false)."""
    softmax = SoftmaxConfig(mode=mode, k=args.k, random_negatives=args.random_negatives)
    clf = graph = None
    try:
        _reset_peak(device)
        clf = OneProcessClassifier(random_rows(classes, args.dim, 0, device), softmax,
                                   OptimConfig(), seed=0)
        held = clf.state_nbytes()
        if mode == "knn":
            clf.graph = graph = random_device_graph(classes, args.k, 0, device)
            held += graph.nbytes
        backbone, inputs = _backbone(args, device)
        result = _timed_steps(args, clf, backbone, inputs, device)
        peak = _peak_bytes(device)
        return {"fits": True, **result, "peak_bytes": peak, "held_bytes": held,
                "peak_over_held": peak / held, "graph": "random" if graph else None}
    except torch.OutOfMemoryError as exc:
        return {"fits": False, "error": str(exc).splitlines()[0][:200]}
    finally:
        del clf, graph
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _search(x_CD: torch.Tensor, num_queries: int, k: int, device) -> float:
    """Seconds of the exact top-k of the first `num_queries` unit rows among all of `x_CD`."""
    from app.knn.torch_search import local_topk  # noqa: PLC0415 - imports app.knn (h5py)

    score = torch.full((num_queries, k), -torch.inf, device=device)
    ids = torch.full((num_queries, k), -1, dtype=torch.int64, device=device)
    _sync(device)
    started = time.perf_counter()
    local_topk(x_CD, 0, x_CD[:num_queries], score, ids, k)
    _sync(device)
    return time.perf_counter() - started


def _graph_build(args, device, deadline: float) -> dict:
    """Exact graph builds of random unit rows (the search's cost does not depend on the
    values): a probe of up to 4096 queries (512 on the CPU) against all C rows gives an
    estimate; builds whose estimate fits --build-budget-s (and the time left) are run in
    full."""
    try:
        import app.knn.torch_search  # noqa: F401, PLC0415 - app.knn needs h5py
    except ImportError as exc:
        return {"skipped": f"app.knn is not importable here ({exc})"}
    out = {}
    for classes in sorted(int(c) for c in args.classes):
        if 4 * classes * (args.dim + 3 * args.k) > USABLE * _memory_total(device):
            out[str(classes)] = {"skipped": "the rows and candidate lists do not fit"}
            continue
        x = random_rows(classes, args.dim, 1, device)
        x.div_(x.norm(dim=1, keepdim=True))  # unit rows, in place
        probe = min(classes, 4096 if device.type == "cuda" else 512)
        _search(x, min(probe, 64), args.k, device)  # warm-up
        estimate = _search(x, probe, args.k, device) * classes / probe
        entry = {"estimated_s": estimate, "probe_queries": probe}
        if estimate <= min(args.build_budget_s, deadline - time.perf_counter()):
            entry["measured_s"] = _search(x, classes, args.k, device)
        out[str(classes)] = entry
        del x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def capacity(runs: dict, args, total: int) -> dict:
    """Per mode, the most classes that fit: (usable memory - the largest fitting run's peak
    beyond its predicted bytes) / the predicted bytes per class. An estimate, not a run."""
    out = {}
    for mode in args.modes:
        fitting = [(int(c), r[mode]) for c, r in runs.items() if r.get(mode, {}).get("fits")]
        if not fitting:
            continue
        classes, run = max(fitting)
        per_class = predicted_bytes(mode, 1, args)
        extra = max(0, run["peak_bytes"] - predicted_bytes(mode, classes, args))
        if args.device_type == "cpu":
            extra = 0  # ru_maxrss holds the whole process: no extra to take off
        out[mode] = {"classes": int((USABLE * total - extra) / per_class),
                     "bytes_per_class": per_class, "from_run_at": classes}
    return out


def summary(runs: dict, builds: dict, fit: dict, args) -> list[str]:
    lines = []
    knn = {int(c): r["knn"] for c, r in runs.items() if r.get("knn", {}).get("fits")}
    if knn:
        low, high = min(knn), max(knn)
        ratio = knn[high]["samples_per_s"] / knn[low]["samples_per_s"]
        lines.append(f"knn samples/s at C={high:.0e} over C={low:.0e}: {ratio:.2f} "
                     f"(target >= 0.5)")
        worst = max(r["peak_over_held"] for r in knn.values())
        lines.append(f"knn peak memory over rows + momentum + graph: at most {worst:.2f}x "
                     f"(target <= {TARGET_PEAK_RATIO})")
    for mode, f in fit.items():
        lines.append(f"{mode}: about {f['classes']:.3g} classes fit (estimate)")
    measured = [int(c) for c, b in builds.items() if "measured_s" in b]
    if measured:
        top = max(measured)
        lines.append(f"exact graph build of C={top:.0e}: {builds[str(top)]['measured_s']:.1f} s")
    return lines


def plot(plt, result: dict):
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in result["modes"]:
        points = sorted((int(c), r[mode]["samples_per_s"]) for c, r in result["runs"].items()
                        if r.get(mode, {}).get("fits"))
        if points:
            ax.plot(*zip(*points), marker="o", label=mode)
    ax.set_xscale("log")
    ax.set_xlabel("classes C")
    ax.set_ylabel("samples/s (one process)")
    ax.set_title(f"app.bench gpu on {result['device_name']} ({result['device']})")
    ax.legend()
    return fig


def write(args, result: dict) -> Path:
    """NAME.json (the command and date first) and, where matplotlib is installed, NAME.png."""
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        from common.files import write_text_atomic  # noqa: PLC0415

        args.results.mkdir(parents=True, exist_ok=True)
        path = args.results / f"{args.name}.json"
        result = {"command": result.pop("command"),
                  "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **result}
        write_text_atomic(path, json.dumps(result, indent=1) + "\n")
        print(f"wrote {path} (no PNG: matplotlib is not installed)")
        return path
    from app.bench.results import write_result  # noqa: PLC0415

    command = result.pop("command")
    return write_result(args.results, args.name, command, result, plot)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m app.bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments(p)
    args = p.parse_args(argv)
    device = _device(args.device)
    args.device_type = device.type
    args.name = args.name or ("gpu_capacity" if device.type == "cuda" else "gpu_cpu_smoke")
    started = time.perf_counter()
    deadline = started + args.time_limit_s
    total = _memory_total(device)
    runs = {}
    for classes in sorted(int(c) for c in args.classes):
        runs[str(classes)] = {}
        for mode in args.modes:
            need = predicted_bytes(mode, classes, args)
            if need > USABLE * total:
                entry = {"fits": False, "skipped": f"needs about {need / 2**30:.1f} GiB of "
                                                   f"{total / 2**30:.1f} GiB"}
            elif time.perf_counter() > deadline:
                entry = {"fits": None, "skipped": "time limit"}
            else:
                entry = _run(args, mode, classes, device)
            entry["predicted_bytes"] = need
            runs[str(classes)][mode] = entry
            print(f"C={classes:>11} {mode:>4}: {json.dumps(entry)}", flush=True)
    builds = _graph_build(args, device, deadline)
    print(f"graph builds: {json.dumps(builds)}", flush=True)
    fit = capacity(runs, args, total)
    lines = summary(runs, builds, fit, args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"command": bench_command(["gpu", *argv]), "device": device.type,
              "device_name": name, "note": ("CPU run: a smoke test of the benchmark's code, "
                                            "not the one-GPU measurement"
                                            if device.type == "cpu" else "one-GPU measurement"),
              "memory_total_bytes": total, "modes": args.modes,
              "settings": {k: v for k, v in vars(args).items()
                           if k not in ("results", "name", "device_type")},
              "torch": torch.__version__, "runs": runs, "graph_build": builds,
              "capacity_estimate": fit, "summary": lines,
              "wall_s": time.perf_counter() - started}
    write(args, result)
    for line in lines:
        print(line)
    return 0
