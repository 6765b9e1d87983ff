"""No config key is accepted and ignored: for EVERY key of `Config`, changing it changes what a
training run does (its losses, evaluations, files, graphs, weights or threads), or the change is
refused with a ValueError. Runs are tiny and in-process (one rank, no MPI).

A new key without an entry in KEY_CHANGES fails `test_every_key_has_a_change`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import typing
from pathlib import Path

import h5py
import numpy as np
import pytest

from app.config import Config, load_config
from app.training.trainer import Trainer
from data_prep.synthetic import SyntheticParams, generate
from mpi.world import fake_world

BASE = ["train.steps=4", "train.batch_size=16", "train.log_every=1", "train.eval_batch_size=32",
        "train.checkpoint_every=2", "model.mlp_hidden=16", "model.embedding_dim=8",
        "optim.classifier_lr=1.0", "schedule.warmup_steps=0"]
KNN = ["softmax.mode=knn", "softmax.k=8", "knn.refresh_every=2"]
# schedule.decay=adaptive deciding after every step (a batch of 64: the loss falls from step 3);
# threshold 0.9: every window after the first is flat (cuts after steps 2, 3, 4).
ADAPTIVE = ["schedule.decay=adaptive", "schedule.adaptive_window=1",
            "schedule.adaptive_threshold=0.9", "train.batch_size=64"]
SPARSE = ["comm.gradients=sparse", "comm.dense_below=64"]  # the 16 x 16 weights go sparse
IMAGES = ["data.path={images}", "model.backbone=resnet", "model.resnet_blocks=[1]",
          "model.resnet_width=4", "train.batch_size=8"]

# key -> (context overrides, the changed value). The run with the context alone is compared
# with the run with the context and the changed value.
KEY_CHANGES: dict[str, tuple[list[str], str]] = {
    "seed": ([], "seed=5"),
    "out_dir": ([], "out_dir={tmp}/elsewhere"),
    "data.path": ([], "data.path={other}"),
    "data.prefetch": ([], "data.prefetch=0"),
    "data.augment": (IMAGES, "data.augment=false"),
    "model.backbone": ([], "model.backbone=resnet"),
    "model.embedding_dim": ([], "model.embedding_dim=4"),
    "model.mlp_hidden": ([], "model.mlp_hidden=12"),
    "model.mlp_layers": ([], "model.mlp_layers=1"),
    "model.resnet_blocks": (IMAGES, "model.resnet_blocks=[2]"),
    "model.resnet_width": (IMAGES, "model.resnet_width=6"),
    "model.classifier_init": ([], "model.classifier_init=centres"),
    # Used only with --init-from (tests/integration/test_init_from.py): refused without it.
    "model.new_rows": ([], "model.new_rows=random"),
    "model.keep_row_momentum": ([], "model.keep_row_momentum=true"),
    "train.steps": ([], "train.steps=3"),
    "train.batch_size": ([], "train.batch_size=12"),
    "train.log_every": ([], "train.log_every=2"),
    "train.eval_every": ([], "train.eval_every=2"),
    "train.eval_batch_size": (["train.eval_max_samples=10"], "train.eval_batch_size=4"),
    "train.eval_max_samples": ([], "train.eval_max_samples=10"),
    "train.checkpoint_every": ([], "train.checkpoint_every=1"),
    "train.keep_checkpoints": (["train.checkpoint_every=1"], "train.keep_checkpoints=1"),
    "train.crash_at_step": ([], "train.crash_at_step=2"),
    "train.dtype": ([], "train.dtype=float64"),
    # lr 1e30 makes the loss NaN from step 2 on: `skip` completes the run (3 skipped steps, each
    # a metrics.jsonl record), `stop` ends it at step 2 with an error naming the key.
    "train.on_nonfinite": (["optim.lr=1e30", "train.on_nonfinite=skip"],
                           "train.on_nonfinite=stop"),
    "train.freeze_backbone_steps": ([], "train.freeze_backbone_steps=2"),
    "train.checkpoint_at_start": ([], "train.checkpoint_at_start=true"),
    # The backbone under bf16 autocast: other features, so other losses and weights.
    "train.precision": ([], "train.precision=bf16"),
    "train.rows_dtype": ([], "train.rows_dtype=bf16"),  # refused: not available
    "softmax.mode": ([], "softmax.mode=sampled"),
    "softmax.k": (KNN, "softmax.k=4"),
    "softmax.random_negatives": (KNN, "softmax.random_negatives=4"),
    "softmax.sample_rate": (["softmax.mode=sampled"], "softmax.sample_rate=0.5"),
    "softmax.logit": ([], "softmax.logit=dot"),
    "softmax.scale": ([], "softmax.scale=10"),
    "softmax.margin": ([], "softmax.margin=0.2"),
    "softmax.margin_type": (["softmax.margin=0.2"], "softmax.margin_type=arcface"),
    "knn.refresh_every": (KNN, "knn.refresh_every=3"),
    "knn.rebuild_every": (KNN, "knn.rebuild_every=2"),
    "knn.index": (KNN, "knn.index=hnsw"),
    "knn.nprobe": (KNN + ["knn.index=ivf"], "knn.nprobe=1"),
    "knn.init": (KNN, "knn.init=random"),
    # The refresh of step 2 is swapped in before step 3 instead of 2: other losses.
    "knn.refresh_lag": (KNN, "knn.refresh_lag=1"),
    # The same training (tests/mpi/test_knn_refresh.py); the build ran in a thread beside the
    # loop, which the graph file's index_detail records.
    "knn.refresh_mode": (KNN + ["knn.refresh_lag=1"], "knn.refresh_mode=background"),
    "comm.gradients": (["model.mlp_hidden=64"], "comm.gradients=sparse"),  # 16 x 64 weights: sparse
    # Sparse even on one rank: the top-k selection and the residuals change the update.
    "comm.sparse_ratio": (SPARSE, "comm.sparse_ratio=0.1"),
    "comm.sparse_warmup_steps": (SPARSE, "comm.sparse_warmup_steps=3"),
    "comm.dense_below": (SPARSE, "comm.dense_below=100000"),
    "comm.momentum_correction": (SPARSE, "comm.momentum_correction=true"),
    # The same training (tests/mpi/test_overlap.py); metrics.jsonl records the micro-batches.
    "comm.overlap": ([], "comm.overlap=true"),
    "comm.micro_batches": (["comm.overlap=true"], "comm.micro_batches=4"),
    "optim.name": ([], "optim.name=adamw"),
    "optim.lr": ([], "optim.lr=0.01"),
    "optim.momentum": ([], "optim.momentum=0.5"),
    "optim.weight_decay": ([], "optim.weight_decay=0.1"),
    "optim.betas": (["optim.name=adamw"], "optim.betas=[0.5,0.9]"),
    "optim.trust_coefficient": (["optim.name=lars"], "optim.trust_coefficient=0.01"),
    "optim.eps": (["optim.name=lamb"], "optim.eps=0.001"),
    "optim.classifier_lr": ([], "optim.classifier_lr=0.1"),
    "optim.classifier_momentum": ([], "optim.classifier_momentum=0.5"),
    "optim.classifier_weight_decay": ([], "optim.classifier_weight_decay=0.1"),
    "schedule.warmup_steps": ([], "schedule.warmup_steps=3"),
    "schedule.decay": ([], "schedule.decay=constant"),
    "schedule.min_lr_ratio": ([], "schedule.min_lr_ratio=0.5"),
    "schedule.milestones": (["schedule.decay=step"], "schedule.milestones=[1]"),
    "schedule.gamma": (["schedule.decay=step", "schedule.milestones=[1]"], "schedule.gamma=0.5"),
    "schedule.adaptive_factor": (ADAPTIVE, "schedule.adaptive_factor=0.25"),
    "schedule.adaptive_threshold": (ADAPTIVE, "schedule.adaptive_threshold=0"),
    "schedule.adaptive_window": (ADAPTIVE, "schedule.adaptive_window=2"),
    # Floor 0.5 reached by the cut after step 2; the flat step 3 then ends the run.
    "schedule.adaptive_stop": (ADAPTIVE + ["schedule.min_lr_ratio=0.5"],
                               "schedule.adaptive_stop=true"),
}


def leaf_keys(cls=Config, prefix="") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_every_key_has_a_change():
    assert sorted(KEY_CHANGES) == sorted(leaf_keys())


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    for name, kind, classes, dim in (("vectors", "vectors", 200, 16), ("other", "vectors", 150, 16),
                                     ("images", "images", 20, 16)):
        generate(root / name, SyntheticParams(seed=1, dim=dim, kind=kind, per_class=4,
                                              val_per_class=2, image_size=8), classes,
                 progress=False)
    return root


def run(datasets, tmp: Path, overrides: list[str]) -> dict:
    """A fingerprint of what a run did, or the error that refused it."""
    values = {"tmp": tmp, "images": datasets / "images", "other": datasets / "other"}
    sets = [o.format(**values) for o in
            [f"data.path={datasets / 'vectors'}", f"out_dir={tmp}/run", *BASE, *overrides]]
    threads_before = threading.active_count()
    try:
        cfg = load_config(None, sets)
        trainer = Trainer(fake_world(), cfg, False, logging.getLogger("test_config_keys"))
        position = trainer.reader.state_dict()
        next(trainer.reader)  # the reader has started (and its read-ahead thread, if any)
        threads = threading.active_count() - threads_before
        trainer.reader.load_state_dict(position)  # back to the first batch
        trainer.run()
    except (ValueError, RuntimeError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"threads": threads, **files_fingerprint(Path(cfg.out_dir)), "out_dir_name":
            Path(cfg.out_dir).name, "weights": digest(trainer.classifier.weight_cD.numpy()),
            "backbone": digest(np.concatenate([p.detach().numpy().ravel()
                                               for p in trainer.backbone.parameters()]))}


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def files_fingerprint(run_dir: Path) -> dict:
    """Metrics without timings, evaluations, checkpoint names, graph files (config.yaml, which
    records every key whatever it does, is left out)."""
    timing = ("samples_per_s", "step_time_s", "comm_time_s", "exposed_comm_s", "compute_s",
              "peak_rss_mb", "knn_build_s", "graph_wait_s")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: v for k, v in line.items() if k not in timing} for line in lines]
    evals = (run_dir / "eval.jsonl").read_text()
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    graphs = {}
    for path in sorted((run_dir / "knn").glob("*.h5")):
        with h5py.File(path, "r") as f:
            graphs[path.name] = (digest(f["neighbors"][:]), str(f.attrs["index_detail"]))
    return {"metrics": metrics, "evals": evals, "checkpoints": checkpoints, "graphs": graphs}


@pytest.mark.parametrize("key", sorted(KEY_CHANGES))
def test_changing_the_key_changes_the_run_or_is_refused(datasets, tmp_path, key):
    context, change = KEY_CHANGES[key]
    base = run(datasets, tmp_path / "base", context)
    assert "error" not in base, base["error"]
    changed = run(datasets, tmp_path / "changed", [*context, change])
    if "error" in changed:
        assert key in changed["error"] or key.split(".")[-1] in changed["error"], changed
        return
    assert changed != base, f"{change} changed nothing a run does"
