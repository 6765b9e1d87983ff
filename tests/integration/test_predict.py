"""app.export and app.predict through the real tools: exact predict equals evaluation's top-k on
1 and 3 ranks, index predict keeps the recall its manifest states, the exported image model
predicts from image files what the run predicts from its shards, and bad input is one line."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from app.inference.output import read_predictions
from tests.integration.conftest import build_shards_cmd, make_image_folder
from tests.integration.launch import mpirun_cmd, run

SMALL = ["train.dtype=float64", "model.embedding_dim=16", "model.mlp_hidden=32",
         "train.eval_batch_size=40", "schedule.warmup_steps=0"]


def train(data, out, steps, batch, *extra):
    args = ["-m", "app.train", "--config", "configs/demo.yaml"]
    for s in [f"data.path={data}", f"out_dir={out}", f"train.steps={steps}",
              f"train.batch_size={batch}", *extra]:
        args += ["--set", s]
    proc = run(mpirun_cmd(1, *args), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def tool(name, *args, timeout=180):
    return run([sys.executable, "-m", f"app.{name}", *map(str, args)], timeout=timeout)


def export(run_dir, out, *extra):
    proc = tool("export", "--run", run_dir, "--out", out, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def by_input(records):
    """input -> [(id, score) by rank]."""
    out = {}
    for r in records:
        out.setdefault(r["input"], []).append((r["rank"], r["id"], r["score"]))
    return {k: [(i, s) for _, i, s in sorted(v)] for k, v in out.items()}


def reference_topk(run_dir, inputs, k):
    """Evaluation's top-k (app.classifier.topk.global_topk, the function app.evaluate uses) of
    the run's newest checkpoint restored in this process."""
    from app import checkpoint
    from app.classifier.topk import global_topk
    from app.config import load_config
    from app.model import as_input, build_model
    from mpi.world import fake_world

    cfg = load_config(str(Path(run_dir) / "config.yaml"), [])
    world = fake_world()
    from data_prep.format import load_dataset_info
    info = load_dataset_info(cfg.data.path)
    backbone, classifier, dtype = build_model(world, cfg, info.input_shape, info.num_classes)
    directory = checkpoint.find_checkpoint(Path(run_dir))
    _, state = checkpoint.restore(directory, info.num_classes, cfg.model.embedding_dim,
                                  classifier)
    backbone.load_state_dict(state["backbone"])
    backbone.eval()
    with torch.no_grad():
        return global_topk(world, classifier, backbone(as_input(inputs, dtype)), k)


def split_inputs(data, split="val"):
    from data_prep.format import load_dataset_info, open_shard

    info = load_dataset_info(data)
    parts = []
    for shard in info.splits[split].shards:
        with open_shard(data, info, shard) as h5:
            parts.append(h5["inputs"][:])
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def vector_model(vectors_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    run_dir = train(vectors_dataset, root / "run", 16, 48, *SMALL)
    return run_dir, export(run_dir, root / "model", "--rows-per-file", "25")


@pytest.mark.parametrize("np_", [1, 3])
def test_exact_predict_equals_evaluation_topk(vectors_dataset, vector_model, tmp_path, np_):
    run_dir, model = vector_model
    out = tmp_path / "pred.jsonl"
    proc = run(mpirun_cmd(np_, "-m", "app.predict", "--model", str(model), "--input",
                          str(vectors_dataset), "--top-k", "5", "--search", "exact",
                          "--batch-size", "32", "--out", str(out)), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = by_input(read_predictions(out))
    scores, ids = reference_topk(run_dir, split_inputs(vectors_dataset), 5)
    assert len(got) == ids.shape[0] == 240
    for i in range(ids.shape[0]):
        assert [c for c, _ in got[f"val/{i}"]] == ids[i].tolist(), f"val/{i}"
        assert np.allclose([s for _, s in got[f"val/{i}"]], scores[i].numpy(), atol=1e-6)


def test_index_predict_is_valid_deterministic_and_keeps_its_recall(vectors_dataset,
                                                                   vector_model, tmp_path):
    _, model = vector_model
    manifest = json.loads((model / "manifest.json").read_text())
    assert len(manifest["rows"]) == 3 and len(manifest["index"]["files"]) == 3  # 60 / 25
    outs = {}
    for name, np_, search in [("exact", 1, "exact"), ("a", 1, "index"), ("b", 2, "index")]:
        outs[name] = tmp_path / f"{name}.tsv"
        proc = run(mpirun_cmd(np_, "-m", "app.predict", "--model", str(model), "--input",
                              str(vectors_dataset), "--search", search, "--out",
                              str(outs[name])), timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
    exact, a, b = (by_input(read_predictions(outs[n])) for n in ("exact", "a", "b"))
    assert a == b, "index search differs between runs (1 and 2 ranks)"
    ids = [c for ranked in a.values() for c, _ in ranked]
    assert all(0 <= c < 60 for c in ids) and all(len(r) == 5 for r in a.values())
    recall_1 = np.mean([a[k][0][0] == exact[k][0][0] for k in exact])
    assert recall_1 >= manifest["index"]["recall"]["at_1_lower_bound"]


def test_pq4_index_export_and_predict_end_to_end(vectors_dataset, vector_model, tmp_path):
    """--index ivf-pq4 (4-bit codes, re-scored rows): export writes it with its recall,
    predict --search index uses it: valid ids, deterministic, recall >= the stated bound."""
    run_dir, _ = vector_model
    model = export(run_dir, tmp_path / "model", "--index", "ivf-pq4")
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["index"]["kind"] == "ivf-pq4"
    outs = {}
    for name, search in [("exact", "exact"), ("a", "index"), ("b", "index")]:
        outs[name] = tmp_path / f"{name}.jsonl"
        proc = tool("predict", "--model", model, "--input", vectors_dataset, "--search",
                    search, "--out", outs[name])
        assert proc.returncode == 0, proc.stderr[-3000:]
    exact, a, b = (by_input(read_predictions(outs[n])) for n in ("exact", "a", "b"))
    assert a == b and len(a) == 240
    assert all(0 <= c < 60 for ranked in a.values() for c, _ in ranked)
    recall_1 = np.mean([a[k][0][0] == exact[k][0][0] for k in exact])
    assert recall_1 >= manifest["index"]["recall"]["at_1_lower_bound"]


def test_export_refuses_an_existing_out_and_a_damaged_checkpoint(vector_model, tmp_path):
    run_dir, model = vector_model
    proc = tool("export", "--run", run_dir, "--out", model)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    damaged = tmp_path / "run"
    shutil.copytree(run_dir, damaged)
    rows = next((damaged / "checkpoints").glob("step-*/classifier/rows-*.h5"))
    rows.write_bytes(rows.read_bytes()[:200])
    proc = tool("export", "--run", damaged, "--out", tmp_path / "m")
    assert proc.returncode == 2 and not (tmp_path / "m").exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(rows) in lines[0] and "damaged" in lines[0], proc.stderr


def _predict_error(model, input_, out):
    proc = tool("predict", "--model", model, "--input", input_, "--out", out)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert not Path(out).exists()
    return lines[0]


def test_bad_model_directory_or_input_is_one_line(vector_model, image_folder, tmp_path):
    _, model = vector_model
    out = tmp_path / "p.jsonl"
    assert "no such model directory" in _predict_error(tmp_path / "nothing", model, out)
    damaged = tmp_path / "model"
    shutil.copytree(model, damaged)
    rows = next(damaged.glob("rows/rows-*.h5"))
    rows.write_bytes(rows.read_bytes()[:-10])
    assert str(rows) in _predict_error(damaged, model, out)
    wrong_dim = tmp_path / "x.npy"
    np.save(wrong_dim, np.zeros((3, 7), np.float32))
    assert "shape (7,)" in _predict_error(model, wrong_dim, out)
    assert "image files, but the model takes vectors" in _predict_error(model, image_folder, out)


def test_exported_image_model_predicts_as_the_run_from_image_files(tmp_path):
    """Images rendered, shards built, a ResNet trained briefly, exported; predict on the image
    FILES gives the classes the run's own model gives for the same images in its shards."""
    folder = make_image_folder(tmp_path / "images", classes=3, per_class=6)
    proc = run([sys.executable, *build_shards_cmd(folder, tmp_path / "data")], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = train(tmp_path / "data", tmp_path / "run", 4, 8, "model.backbone=resnet",
                    "model.resnet_blocks=[1]", "model.resnet_width=4",
                    "model.embedding_dim=8", "schedule.warmup_steps=0")
    model = export(run_dir, tmp_path / "model")
    out = tmp_path / "pred.jsonl"
    proc = tool("predict", "--model", model, "--input", folder, "--top-k", "3",
                "--search", "exact", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for bad in ("class0/corrupt.jpg", "class1/empty.jpg", "class2/notes.jpg"):
        assert f"skipped {bad}" in proc.stderr
    got = by_input(read_predictions(out))
    shard_images = np.concatenate([split_inputs(tmp_path / "data", s) for s in ("train", "val")])
    row_of = {img.tobytes(): i for i, img in enumerate(shard_images)}
    _, ref_ids = reference_topk(run_dir, shard_images, 3)
    from data_prep.images import load_image
    assert len(got) == 18
    for name, ranked in got.items():
        row = row_of[load_image(str(folder / name), 16).tobytes()]
        assert [c for c, _ in ranked] == ref_ids[row].tolist(), name


def test_verify_hashes_large_files_and_step_picks_the_checkpoint(vector_model, tmp_path,
                                                                 monkeypatch):
    """A same-size change of a file above ALWAYS_HASH_BYTES passes the size check and is found
    only with verify (app.predict --verify); --step names the checkpoint to export."""
    from app.inference import model_dir as md

    run_dir, model = vector_model
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    manifest = md.read_manifest(copy)
    rows = copy / manifest["rows"][0]["file"]
    data = bytearray(rows.read_bytes())
    data[-1] ^= 0xFF
    rows.write_bytes(bytes(data))
    monkeypatch.setattr(md, "ALWAYS_HASH_BYTES", 0)
    md.check_files(copy, manifest)
    with pytest.raises(ValueError, match="checksum differs"):
        md.check_files(copy, manifest, verify=True)
    proc = tool("export", "--run", run_dir, "--step", "3", "--out", tmp_path / "m")
    assert proc.returncode == 2 and "no complete checkpoint of step 3" in proc.stderr
    assert json.loads((model / "manifest.json").read_text())["source"]["step"] == 16
