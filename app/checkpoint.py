"""Checkpoints that survive a change of world size, written so a crash never leaves a
half-checkpoint that looks complete.

Layout of `out_dir/checkpoints/step-NNNNNNNN/`:
  classifier/rows-START-STOP.h5   one file per saving rank, rows by GLOBAL class range
  trainer.pt                      backbone, backbone optimizer, schedule, RNG (rank 0; replicated)
  manifest.json                   written LAST by atomic rename: a directory without it is
                                  incomplete and ignored (and cleaned up by the next save)
The manifest records step, world size, class ranges, data position and the config hash; the loader
checks it against the current run and explains any mismatch.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from mpi import collectives

FORMAT_VERSION = 1


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories (those with a manifest), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "manifest.json").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save(world, run_dir: Path, step: int, classifier, trainer_state: dict, data_position: dict,
         config_hash: str, keep: int) -> Path:
    """Collective: every rank writes its classifier rows, rank 0 the replicated state; after a
    barrier rank 0 writes the manifest and deletes all but the newest `keep` checkpoints."""
    directory = step_dir(run_dir, step)
    if world.is_root:
        if directory.exists():  # a leftover of a crash during an earlier save of this step
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
    world.barrier()
    entry = classifier.save(directory)
    entries = collectives.allgather_object(world, entry)
    if world.is_root:
        tmp = directory / "trainer.pt.tmp"
        torch.save(trainer_state, tmp)
        os.replace(tmp, directory / "trainer.pt")
    world.barrier()  # every rank's rows are on disk before the manifest says so
    if world.is_root:
        manifest = {
            "format_version": FORMAT_VERSION, "step": step, "world_size": world.size,
            "num_classes": classifier.num_classes, "embedding_dim": classifier.dim,
            "dtype": str(classifier.weight_cD.dtype).replace("torch.", ""),
            "class_ranges": [[e["start"], e["stop"]] for e in entries], "classifier": entries,
            "trainer_state": "trainer.pt", "data_position": data_position,
            "config_hash": config_hash, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_json_atomic(directory / "manifest.json", manifest)
        _prune(run_dir, keep, current=directory)
    world.barrier()
    return directory


def _prune(run_dir: Path, keep: int, current: Path) -> None:
    complete = complete_checkpoints(run_dir)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in (Path(run_dir) / "checkpoints").glob("step-*"):
        if partial != current and not (partial / "manifest.json").exists():
            shutil.rmtree(partial, ignore_errors=True)


def read_manifest(directory: Path, num_classes: int, embedding_dim: int) -> dict:
    """The manifest of a complete checkpoint, checked against the current run."""
    path = Path(directory) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable checkpoint manifest ({exc})") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {manifest.get('format_version')}, "
                         f"this version reads {FORMAT_VERSION}")
    if manifest["num_classes"] != num_classes:
        raise ValueError(f"{path}: checkpoint has {manifest['num_classes']} classes but the "
                         f"dataset has {num_classes}; resume with the dataset it was trained on")
    if manifest["embedding_dim"] != embedding_dim:
        raise ValueError(f"{path}: checkpoint has embedding dimension "
                         f"{manifest['embedding_dim']} but model.embedding_dim={embedding_dim}; "
                         f"resume with the same model.embedding_dim")
    return manifest


def load(directory: Path, manifest: dict, classifier) -> dict:
    """Load this rank's classifier rows (re-partitioned for the current world size) and return
    the replicated trainer state."""
    classifier.load(directory, manifest["classifier"])
    path = Path(directory) / manifest["trainer_state"]
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read trainer state ({exc})") from exc


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
