"""The GPU-relevant checks of scripts/gpu_check.sh, as a plain program (no pytest needed: a GPU
node may have only torch, numpy and h5py): `python -m tests.gpu_checks --device cuda --out DIR`.

1. softmax parity on the device: `OneProcessClassifier` (app/bench/gpu_model.py, the one-rank
   path of the project's classifier) on `--device`, float32, in `full` and `knn` (K = C, and
   K < C with random negatives), cosine with CosFace and ArcFace margins and dot logits, against
   the one-process float64 CPU reference (tests/softmax_reference.py): loss, feature gradient and
   row gradients to FP32_TOLERANCE; and with features from a bf16 backbone
   (train.precision=bf16) to BF16_TOLERANCE.
2. precision: the MLP and ResNet backbones under bf16 on the device run their matmuls and
   convolutions in bf16 and return float32 features and gradients.
3. the `torch` graph index (app/knn build_graph, index=torch) with the rows on the device
   against the same build on the CPU: neighbour ids equal but for ties, similarities to 1e-4.
4. ShardedClassifier (the trainer's) with rows on the device: informational only ("info"), as
   its device placement is not part of this version.

Writes DIR/gpu_checks.json; exit 1 when a check failed. Runs on the CPU too (`--device cpu`),
which is how tests/unit/test_gpu_check_script.py runs it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from app.bench.gpu_model import DeviceGraph, OneProcessClassifier
from app.config import ModelConfig, OptimConfig, SoftmaxConfig
from tests.softmax_reference import (BF16_TOLERANCE, FullGraph, RandomGraph,
                                     bf16_backbone_features, dense_reference, knn_reference,
                                     make_problem)

FP32_TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}
LOGITS = [("cosine", 0.2, "cosface"), ("cosine", 0.3, "arcface"), ("dot", 0.0, "cosface")]


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tolerance: dict) -> dict:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    try:
        torch.testing.assert_close(got, want, **tolerance)
        ok = True
    except AssertionError:
        ok = False
    return {"what": name, "ok": ok, "max_abs_err": float((got - want).abs().max())}


def _table(graph, num_classes: int, device) -> DeviceGraph:
    return DeviceGraph(torch.from_numpy(np.asarray(graph.rows(np.arange(num_classes)),
                                                   dtype=np.int32)).to(device))


def softmax_case(device, mode: str, logit: str, margin: float, margin_type: str,
                 precision: str, k: int) -> list[dict]:
    classes, batch, dim = 23, 10, 6
    cfg = SoftmaxConfig(mode=mode, k=k, random_negatives=0 if k == classes else 5, logit=logit,
                        scale=8.0 if logit == "cosine" else 1.0, margin=margin,
                        margin_type=margin_type)
    feat, labels, weight = make_problem(0, 1, batch, classes, dim)
    clf = OneProcessClassifier(weight.float().to(device), cfg, OptimConfig(), seed=0)
    graph = FullGraph(classes) if k == classes else RandomGraph(classes, k)
    if mode == "knn":
        clf.graph = _table(graph, classes, device)
    x = feat.float().to(device).requires_grad_()
    f = x if precision == "fp32" else bf16_backbone_features(x)
    loss = clf.loss(f, labels.to(device), step=3)
    loss.backward()
    rows, grads = clf.row_grads()
    if mode == "full" or k == classes:
        ref_loss, ref_dfeat, ref_dweight = dense_reference(feat, labels, weight, cfg)
    else:
        from app.classifier.knn_softmax import active_classes  # noqa: PLC0415

        cls_NA, valid_NA = active_classes(labels, graph, classes, cfg.random_negatives,
                                          clf._generator(3, 0))
        ref_loss, ref_dfeat, ref_dweight = knn_reference(feat, labels, weight, cls_NA,
                                                         valid_NA, cfg)
    rows = torch.arange(classes) if rows is None else rows.cpu()
    tolerance = FP32_TOLERANCE if precision == "fp32" else BF16_TOLERANCE
    name = f"{mode} k={k} {logit} {margin_type} m={margin} {precision}"
    return [_close(f"{name}: loss", loss, ref_loss, tolerance),
            _close(f"{name}: feature gradient", x.grad, ref_dfeat, tolerance),
            _close(f"{name}: row gradients", grads, ref_dweight[rows], tolerance)]


def softmax_checks(device) -> list[dict]:
    out = []
    for precision in ("fp32", "bf16"):
        for logit, margin, margin_type in LOGITS:
            for mode, k in (("full", 23), ("knn", 23), ("knn", 6)):
                out += softmax_case(device, mode, logit, margin, margin_type, precision, k)
    return out


def precision_checks(device) -> list[dict]:
    from app.backbones import build_backbone  # noqa: PLC0415
    from app.training.precision import backbone_features  # noqa: PLC0415

    out = []
    for cfg, x in ((ModelConfig(embedding_dim=16), torch.randn(8, 32)),
                   (ModelConfig(backbone="resnet", embedding_dim=16),
                    torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8))):
        torch.manual_seed(0)
        model = build_backbone(cfg, tuple(x.shape[1:])).to(device)
        seen = set()
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.register_forward_hook(lambda _m, _i, o, seen=seen: seen.add(o.dtype))
        feat = backbone_features(model, x.to(device), "bf16")
        feat.square().sum().backward()
        grads = {p.grad.dtype for p in model.parameters()}
        out.append({"what": f"{cfg.backbone} under bf16 on {device}", "ok": seen == {
            torch.bfloat16} and feat.dtype == torch.float32 and grads == {torch.float32},
            "matmul_dtypes": sorted(map(str, seen))})
    return out


def graph_checks(device, classes: int = 20_000, dim: int = 64, k: int = 32) -> list[dict]:
    from app.knn import build_graph  # noqa: PLC0415
    from mpi.world import fake_world  # noqa: PLC0415

    rows = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    on_device = build_graph(fake_world(), rows.to(device), 0, classes, k, index="torch")
    device_s = time.perf_counter() - started
    on_cpu = build_graph(fake_world(), rows, 0, classes, k, index="torch")
    same_ids = float((on_device.neighbors_ck == on_cpu.neighbors_ck).all(axis=1).mean())
    sim_err = float(np.abs(on_device.similarity_ck - on_cpu.similarity_ck).max())
    # Ties and near-ties (|difference| below float32 rounding) may swap neighbours.
    return [{"what": f"torch graph of {classes} rows on {device} against the CPU", "ok":
             same_ids >= 0.999 and sim_err <= 1e-4, "rows_with_identical_ids": same_ids,
             "max_similarity_err": sim_err, "device_s": device_s,
             "detail": on_device.detail}]


def sharded_info(device) -> list[dict]:
    """The trainer's ShardedClassifier with its rows moved to the device (not required)."""
    from app.classifier import ShardedClassifier  # noqa: PLC0415
    from mpi.world import fake_world  # noqa: PLC0415

    cfg = SoftmaxConfig(mode="knn", k=23, random_negatives=0)
    try:
        clf = ShardedClassifier(fake_world(str(device)), 23, 6, cfg, OptimConfig(), 0)
        clf.weight_cD = clf.weight_cD.to(device)
        clf.set_graph(FullGraph(23))
        feat = torch.randn(10, 6, device=device, requires_grad=True)
        clf.loss(feat, torch.randint(0, 23, (10,), device=device), 0)[0].backward()
        return [{"what": f"ShardedClassifier knn on {device}", "ok": True, "info": True}]
    except Exception as exc:  # noqa: BLE001 - informational
        return [{"what": f"ShardedClassifier knn on {device}", "ok": False, "info": True,
                 "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.gpu_checks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--graph-classes", type=int, default=20_000,
                   help="rows of the graph check (check 3)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    results = {}
    for name, check in (("softmax", softmax_checks), ("precision", precision_checks),
                        ("graph", lambda d: graph_checks(d, args.graph_classes)),
                        ("sharded_classifier", sharded_info)):
        try:
            results[name] = check(device)
        except Exception:  # noqa: BLE001 - one failing part must not hide the others
            results[name] = [{"what": name, "ok": False, "error": traceback.format_exc()}]
    failed = [r["what"] for rs in results.values() for r in rs
              if not r["ok"] and not r.get("info")]
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    (args.out / "gpu_checks.json").write_text(json.dumps(
        {"device": str(device), "device_name": name, "torch": torch.__version__,
         "failed": failed, "checks": results}, indent=1) + "\n")
    for rs in results.values():
        for r in rs:
            print(f"{'ok  ' if r['ok'] else ('info' if r.get('info') else 'FAIL')} {r['what']}")
    print(f"{len(failed)} failed; wrote {args.out / 'gpu_checks.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
