"""`app.train --init-from`: a run on a grown dataset started from an earlier run's checkpoint,
through the real launcher. One 2-rank run on the old dataset (module fixture) is the source.

References are independent and float64: the new rows' centres are computed here in one process
from the dataset's raw train inputs through the checkpoint's backbone in eval mode (as the
product's centre pass, app/classifier/centres.py), mean feature then unit norm.
"""
import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.integration.conftest import make_dataset
from tests.integration.launch import mpirun_cmd, run

OLD_CLASSES, NEW_CLASSES, DIM = 20, 6, 8
BASE = ["train.dtype=float64", "train.log_every=1", "model.embedding_dim=8",
        "model.mlp_hidden=16", "train.eval_batch_size=40", "schedule.warmup_steps=0",
        "optim.classifier_lr=1.0"]


def train(np_, data, out, steps, batch, *extra, init_from=None, resume=False, timeout=180):
    args = ["-m", "app.train", "--config", "configs/demo.yaml"]
    for s in [f"data.path={data}", f"out_dir={out}", f"train.steps={steps}",
              f"train.batch_size={batch}", *BASE, *extra]:
        args += ["--set", s]
    if init_from is not None:
        args += ["--init-from", str(init_from)]
    if resume:
        args.append("--resume")
    return run(mpirun_cmd(np_, *args), timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("initfrom")
    old = make_dataset(root / "old", classes=OLD_CLASSES, per_class=8, val_per_class=2, dim=DIM)
    grown = run([sys.executable, "-m", "data_prep.synthetic", "--out", str(root / "new"),
                 "--grow-from", str(old), "--new-classes", str(NEW_CLASSES)], timeout=120)
    assert grown.returncode == 0, grown.stderr
    source = train(2, old, root / "oldrun", 4, 16)
    assert source.returncode == 0, source.stderr[-3000:]
    return {"root": root, "old": old, "new": root / "new", "run": root / "oldrun",
            "ckpt": root / "oldrun/checkpoints/step-00000004"}


def rows(ckpt, name="weight"):
    """All rows of a checkpoint, concatenated by class range (any world size)."""
    manifest = json.loads(Path(ckpt, "manifest.json").read_text())
    parts = []
    for entry in sorted(manifest["classifier"], key=lambda e: e["start"]):
        with h5py.File(Path(ckpt, entry["file"]), "r") as f:
            parts.append(f[name][:])
    return np.concatenate(parts)


def backbone_params(ckpt):
    state = torch.load(Path(ckpt, "trainer.pt"), weights_only=True)["backbone"]
    return {k: v.numpy().copy() for k, v in state.items()}


def reference_centres(data_dir, ckpt):
    """float64 mean feature of every class under the checkpoint's backbone (eval mode), at unit
    norm, from the raw train inputs of the dataset."""
    from app.backbones import build_backbone
    from app.config import load_config

    cfg = load_config(None, BASE)
    net = build_backbone(cfg.model, (DIM,)).to(torch.float64)
    net.load_state_dict(torch.load(Path(ckpt, "trainer.pt"), weights_only=True)["backbone"])
    net.eval()
    inputs, labels = [], []
    for shard in sorted(Path(data_dir, "train").glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            inputs.append(f["inputs"][:])
            labels.append(f["labels"][:])
    x, y = np.concatenate(inputs), np.concatenate(labels)
    with torch.no_grad():
        feat = net(torch.from_numpy(x).to(torch.float64)).numpy()
    num = int(y.max()) + 1
    centres = np.stack([feat[y == c].mean(axis=0) for c in range(num)])
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def first_loss(out):
    return json.loads(Path(out, "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_known_rows_copied_new_rows_at_centres_on_one_and_three_ranks(data):
    """From a 2-rank run onto 1 and 3 ranks (global batch 24): the step-0 checkpoint holds the
    old rows bit for bit and the new rows at the float64 reference centres; the known rows'
    momentum is kept (3 ranks) or zero (1 rank); the first loss is the same on both."""
    ref = reference_centres(data["new"], data["ckpt"])
    old_w, old_m = rows(data["ckpt"]), rows(data["ckpt"], "momentum")
    assert np.abs(old_m).max() > 0
    outs = {}
    for np_, batch, keep in ((1, 24, "false"), (3, 8, "true")):
        out = data["root"] / f"init{np_}"
        proc = train(np_, data["new"], out, 2, batch, "train.checkpoint_at_start=true",
                     f"model.keep_row_momentum={keep}", init_from=data["run"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        start = out / "checkpoints/step-00000000"
        w, m = rows(start), rows(start, "momentum")
        assert w.shape == (OLD_CLASSES + NEW_CLASSES, 8)
        assert np.array_equal(w[:OLD_CLASSES], old_w), "known rows not copied bit for bit"
        np.testing.assert_allclose(w[OLD_CLASSES:], ref[OLD_CLASSES:], rtol=0, atol=1e-12)
        expected_m = old_m if keep == "true" else np.zeros_like(old_m)
        assert np.array_equal(m[:OLD_CLASSES], expected_m)
        assert not m[OLD_CLASSES:].any()
        for key, value in backbone_params(data["ckpt"]).items():
            assert np.array_equal(backbone_params(start)[key], value), key
        record = json.loads((out / "init_from.json").read_text())
        assert record["checkpoint"] == str(data["ckpt"]) and record["step"] == 4
        assert record["num_old"] == OLD_CLASSES
        summary = json.loads((out / "summary.json").read_text())
        assert summary["init_from"] == {"checkpoint": str(data["ckpt"]), "step": 4}
        assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
        outs[np_] = out
    a, b = first_loss(outs[1]), first_loss(outs[3])
    assert abs(a - b) <= 1e-9 * abs(a), (a, b)


def test_random_new_rows_and_frozen_backbone(data):
    """model.new_rows=random: the new rows are a fresh run's seeded rows. With
    train.freeze_backbone_steps=2 the backbone and the known rows stay bit-identical through
    step 2 while the new rows learn; step 3 changes the backbone."""
    from app.classifier.sharded import init_rows

    out = data["root"] / "frozen"
    proc = train(2, data["new"], out, 3, 12, "model.new_rows=random",
                 "train.freeze_backbone_steps=2", "train.checkpoint_at_start=true",
                 "train.checkpoint_every=1", "train.keep_checkpoints=4", init_from=data["ckpt"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = [out / f"checkpoints/step-{s:08d}" for s in range(4)]
    fresh = init_rows(0, OLD_CLASSES, OLD_CLASSES + NEW_CLASSES, 8, torch.float64).numpy()
    assert np.array_equal(rows(ck[0])[OLD_CLASSES:], fresh)
    old_bb = backbone_params(data["ckpt"])
    for step in (1, 2):
        assert all(np.array_equal(backbone_params(ck[step])[k], v) for k, v in old_bb.items())
        assert np.array_equal(rows(ck[step])[:OLD_CLASSES], rows(data["ckpt"]))
        assert not np.array_equal(rows(ck[step])[OLD_CLASSES:], fresh)
    assert not all(np.array_equal(backbone_params(ck[3])[k], v) for k, v in old_bb.items())
    assert not np.array_equal(rows(ck[3])[:OLD_CLASSES], rows(data["ckpt"]))


def _copy_with_changed_key(src, dst, class_id):
    """A copy of dataset `src` whose class `class_id` has another key (classes_sha256 updated)."""
    from data_prep.format import sha256_file

    shutil.copytree(src, dst)
    lines = (dst / "classes.tsv").read_text().splitlines()
    cid, key, count = lines[1 + class_id].split("\t")
    lines[1 + class_id] = f"{cid}\t{key}-renamed\t{count}"
    (dst / "classes.tsv").write_text("\n".join(lines) + "\n")
    info = json.loads((dst / "dataset.json").read_text())
    info["classes_sha256"] = sha256_file(dst / "classes.tsv")
    (dst / "dataset.json").write_text(json.dumps(info))
    return key


def test_refusals_are_one_line_exit_2_nothing_written(data):
    root = data["root"]
    unrelated = make_dataset(root / "unrelated", classes=OLD_CLASSES + NEW_CLASSES, per_class=8,
                             val_per_class=2, dim=DIM, seed=3)
    key = _copy_with_changed_key(data["new"], root / "renamed", 3)
    damaged = root / "damaged"
    shutil.copytree(data["run"], damaged)
    trainer_pt = damaged / "checkpoints/step-00000004/trainer.pt"
    trainer_pt.write_bytes(trainer_pt.read_bytes()[:100])
    cases = [  # (dataset, source, extra, words the line must hold)
        (unrelated, data["run"], [], "does not descend from"),
        (root / "renamed", data["run"], [], f"class 3 is '{key}-renamed'"),
        (data["new"], data["run"], ["model.embedding_dim=4"], "embedding dimension 8"),
        (data["new"], data["run"], ["model.mlp_hidden=32"], "model.mlp_hidden=16 there"),
        (data["new"], root / "nowhere", [], "no such run or checkpoint"),
        (data["new"], damaged, [], "cannot read trainer state"),
        (data["new"], data["run"], ["model.classifier_init=centres"], "model.classifier_init"),
    ]
    for i, (dataset, source, extra, words) in enumerate(cases):
        out = root / f"refused{i}"
        proc = train(2 if i == 0 else 1, dataset, out, 2, 12, *extra, init_from=source)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (words, proc.stderr[-2000:])
        assert len([x for x in lines if x.startswith("error:")]) == 1, proc.stderr
        assert words in proc.stderr, (words, proc.stderr[-2000:])
        assert sorted(p.name for p in out.iterdir()) == [".lock"] if out.exists() else True
    # Without --init-from, its keys are refused rather than ignored.
    proc = train(1, data["new"], root / "plain", 2, 12, "model.new_rows=random")
    assert proc.returncode == 2 and "model.new_rows" in proc.stderr


def test_resume_wins_over_init_from(data):
    """--resume --init-from on an out_dir with a checkpoint continues that run (the same steps
    as one uninterrupted run) and keeps its init-from record."""
    out = data["root"] / "requeued"
    crashed = train(1, data["new"], out, 4, 12, "train.checkpoint_every=2", "train.crash_at_step=3",
                    init_from=data["run"], resume=True)
    assert crashed.returncode != 0 and (out / "checkpoints/step-00000002").is_dir()
    again = train(1, data["new"], out, 4, 12, "train.checkpoint_every=2", init_from=data["run"],
                  resume=True)
    assert again.returncode == 0, again.stderr[-3000:]
    whole = data["root"] / "whole"
    ok = train(1, data["new"], whole, 4, 12, "train.checkpoint_every=2", init_from=data["run"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x)["loss"] for x in (whole / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(losses, ref, rtol=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-00000002")
    assert summary["init_from"]["step"] == 4


def test_knn_graph_over_all_rows_and_the_same_dataset(data):
    """knn mode: the step-0 graph is the exact (flat index) K nearest rows by cosine of the
    loaded and new rows (float64 reference); and the very same dataset is accepted (logged)."""
    out = data["root"] / "knn"
    proc = train(2, data["new"], out, 1, 12, "softmax.mode=knn", "softmax.k=4", "knn.index=flat",
                 "train.checkpoint_at_start=true", init_from=data["run"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    w = rows(out / "checkpoints/step-00000000").astype(np.float64)
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    expected = np.argsort(-(unit @ unit.T), axis=1, kind="stable")[:, :4]
    with h5py.File(out / "knn/graph-step-00000000.h5", "r") as f:
        assert np.array_equal(f["neighbors"][:], expected)
    same = train(1, data["old"], data["root"] / "same", 1, 12, init_from=data["run"])
    assert same.returncode == 0, same.stderr[-3000:]
    assert "the run's own dataset" in same.stderr + same.stdout


def test_eval_splits_top1_into_old_and_new_classes(data):
    """On a grown dataset eval.jsonl also holds top-1 over the parent's classes and over the new
    ones; both equal a float64 reference from the final checkpoint (every val sample, cosine
    scores against every row), and the run on the parent's own dataset has no split."""
    from app.backbones import build_backbone
    from app.config import load_config

    out = data["root"] / "init3"  # 3 ranks, 2 steps (the first test)
    record = json.loads((out / "eval.jsonl").read_text().splitlines()[-1])
    ckpt = out / "checkpoints/step-00000002"
    net = build_backbone(load_config(None, BASE).model, (DIM,)).to(torch.float64)
    net.load_state_dict(torch.load(ckpt / "trainer.pt", weights_only=True)["backbone"])
    net.eval()
    shards = sorted(Path(data["new"], "val").glob("shard-*.h5"))
    x = np.concatenate([h5py.File(s, "r")["inputs"][:] for s in shards])
    y = np.concatenate([h5py.File(s, "r")["labels"][:] for s in shards])
    with torch.no_grad():
        feat = net(torch.from_numpy(x).to(torch.float64)).numpy()
    w = rows(ckpt).astype(np.float64)
    scores = (feat / np.linalg.norm(feat, axis=1, keepdims=True)) @ (
        w / np.linalg.norm(w, axis=1, keepdims=True)).T
    hit = scores.argmax(axis=1) == y
    old = y < OLD_CLASSES
    assert record["num_samples_old"] == old.sum() and record["num_samples_new"] == (~old).sum()
    assert record["top1_old"] == pytest.approx(hit[old].mean(), abs=1e-12)
    assert record["top1_new"] == pytest.approx(hit[~old].mean(), abs=1e-12)
    assert record["top1"] == pytest.approx(hit.mean(), abs=1e-12)
    parent = json.loads((data["run"] / "eval.jsonl").read_text().splitlines()[-1])
    assert "top1_old" not in parent and "top1" in parent


def test_old_dataset_moved_away_or_rebuilt(data):
    """The checkpoint manifest records its dataset (classes.tsv sha256): with the old dataset
    gone, --init-from checks the new one's lineage against that record and starts; with the old
    dataset rebuilt in place (another classes.tsv), it refuses in one line."""
    root = data["root"]
    moved = root / "old-copy"
    shutil.copytree(data["old"], moved)
    source = root / "copyrun"
    assert train(1, moved, source, 2, 12).returncode == 0
    manifest = json.loads((source / "checkpoints/step-00000002/manifest.json").read_text())
    old_info = json.loads((data["old"] / "dataset.json").read_text())
    assert manifest["dataset"]["classes_sha256"] == old_info["classes_sha256"]
    assert manifest["dataset"]["num_classes"] == OLD_CLASSES
    shutil.rmtree(moved)
    proc = train(1, data["new"], root / "fromgone", 1, 12, init_from=source)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is not there to read" in proc.stderr + proc.stdout
    make_dataset(moved, classes=OLD_CLASSES, per_class=9, val_per_class=2, dim=DIM)
    proc = train(1, data["new"], root / "fromrebuilt", 1, 12, init_from=source)
    assert proc.returncode == 2 and "changed since the checkpoint was written" in proc.stderr
    assert not (root / "fromrebuilt/checkpoints").exists()
