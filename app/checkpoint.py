"""Checkpoints that survive a change of world size, written so a crash never leaves a
half-checkpoint that looks complete. Every reader of a checkpoint (resume, `app.evaluate`,
`app.knn_graph`) goes through this module.

Layout of `out_dir/checkpoints/step-NNNNNNNN/`:
  classifier/rows-START-STOP.h5   one file per saving rank, rows by GLOBAL class range
                                  (`/weight`, `/momentum`, C_r x D)
  trainer.pt                      backbone, backbone optimizer, schedule, RNG, KNN graph state
                                  (rank 0; replicated); plain tensors and numbers only, read
                                  with `torch.load(weights_only=True)`
  ranks/rank-NNNNN.pt             per-rank state (the sparse-gradient residuals), one file per
                                  rank, only when the run has some (manifest `rank_states`)
  manifest.json                   written LAST by atomic rename: a directory without it is
                                  incomplete and ignored (and cleaned up by the next save)
The manifest records step, world size, class ranges, data position and the config hash; the
loader checks it against the current run and explains any mismatch.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from common.files import atomic_path, write_json_atomic
from mpi import collectives

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer.pt"
# What every reader needs, and what resuming a run needs besides.
ROWS_KEYS = ("step", "num_classes", "embedding_dim", "classifier")
RESUME_KEYS = ROWS_KEYS + ("trainer_state", "data_position", "config_hash", "world_size")


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories (those with a manifest), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MANIFEST).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


# -- writing ------------------------------------------------------------------------------------

def save(world, run_dir: Path, step: int, classifier, trainer_state: dict, data_position: dict,
         config_hash: str, keep: int, rank_state: dict | None = None,
         dataset: dict | None = None) -> Path:
    """Collective: every rank writes its classifier rows (and its `rank_state`, when given:
    None on every rank or on none), rank 0 the replicated state; after a barrier rank 0 writes
    the manifest and deletes all but the newest `keep` checkpoints. `dataset` (rank 0's; path,
    classes_sha256, num_classes of the run's dataset) goes into the manifest, so that a later
    --init-from knows which classes the rows are without that dataset."""
    directory = step_dir(run_dir, step)
    if world.is_root:
        if directory.exists():  # a leftover of a crash during an earlier save of this step
            _delete(directory)
        directory.mkdir(parents=True)
    world.barrier()
    entry = write_rows(directory, classifier.start, classifier.stop, classifier.state_arrays())
    if rank_state is not None:
        entry["rank_state"] = f"ranks/rank-{world.rank:05d}.pt"
        (directory / "ranks").mkdir(exist_ok=True)
        with atomic_path(directory / entry["rank_state"]) as tmp:
            torch.save(rank_state, tmp)
    _injected_delay()
    entries = collectives.allgather_object(world, entry)
    rank_files = [e.pop("rank_state") for e in entries if "rank_state" in e]
    if world.is_root:
        with atomic_path(directory / TRAINER_STATE) as tmp:
            torch.save(trainer_state, tmp)
    world.barrier()  # every rank's rows are on disk before the manifest says so
    if world.is_root:
        manifest = {
            "format_version": FORMAT_VERSION, "step": step, "world_size": world.size,
            "num_classes": classifier.num_classes, "embedding_dim": classifier.dim,
            "dtype": str(classifier.weight_cD.dtype).replace("torch.", ""),
            "class_ranges": [[e["start"], e["stop"]] for e in entries], "classifier": entries,
            "trainer_state": TRAINER_STATE, "data_position": data_position,
            "config_hash": config_hash, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **({"rank_states": rank_files} if rank_files else {}),
        }
        if dataset is not None:
            manifest["dataset"] = dataset
        write_json_atomic(directory / MANIFEST, manifest, sort_keys=True)
        _prune(run_dir, keep, current=directory)
    world.barrier()
    return directory


def write_rows(directory: Path, start: int, stop: int, arrays: dict[str, np.ndarray]) -> dict:
    """One rank's rows [start, stop) (`arrays`: name -> (stop - start) x D) as
    `directory/classifier/rows-START-STOP.h5`, atomically. Returns the manifest entry."""
    import h5py  # noqa: PLC0415

    rel = f"classifier/rows-{start:010d}-{stop:010d}.h5"
    path = Path(directory) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name, rows in arrays.items():
            f.create_dataset(name, data=rows)
        f.attrs.update(start=start, stop=stop)
    return {"start": start, "stop": stop, "file": rel}


def _injected_delay() -> None:
    """Fault injection for tests (docs/design.md, "Fault injection"): every rank waits
    HUNDREDM_FAULT_CHECKPOINT_DELAY_S seconds after writing its rows, as a checkpoint that large
    would take, so signal and crash tests can act while a checkpoint is being written."""
    value = os.environ.get("HUNDREDM_FAULT_CHECKPOINT_DELAY_S")
    if value:
        time.sleep(float(value))


def _prune(run_dir: Path, keep: int, current: Path) -> None:
    """Deletes all but the newest `keep` complete checkpoints and every incomplete one. Each is
    first renamed out of the `step-*` namespace (atomic), so a crash in the middle of a deletion
    never leaves a directory that still has its manifest but lost some rows."""
    root = Path(run_dir) / "checkpoints"
    doomed = complete_checkpoints(run_dir)[:-keep]
    doomed += [p for p in root.glob("step-*") if p != current and not (p / MANIFEST).exists()]
    for old in doomed:
        _delete(old)
    for trash in root.glob("deleting-*"):  # what a crash during a deletion left behind
        shutil.rmtree(trash, ignore_errors=True)


def _delete(directory: Path) -> None:
    """Renames `directory` out of the `step-*` namespace (atomic), then deletes it."""
    trash = directory.with_name(f"deleting-{directory.name}")
    shutil.rmtree(trash, ignore_errors=True)
    directory.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


# -- reading ------------------------------------------------------------------------------------

def find_checkpoint(run_dir: Path, given: str | Path | None = None) -> Path:
    """`given` (a checkpoint directory) or the newest complete checkpoint of `run_dir`;
    ValueError naming the directory when there is none."""
    run_dir = Path(run_dir)
    if given is not None:
        return Path(given)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such run directory")
    directory = latest_checkpoint(run_dir)
    if directory is None:
        raise ValueError(f"{run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}; "
                         f"train with train.checkpoint_every > 0 (or to the end) first")
    return directory


def read_manifest(directory: Path, required: tuple[str, ...] = ROWS_KEYS) -> dict:
    """The manifest of a complete checkpoint, checked for format and the `required` keys."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the checkpoint manifest ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable checkpoint manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: not a readable checkpoint manifest (not a JSON object)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {manifest.get('format_version')}, "
                         f"this version reads {FORMAT_VERSION}")
    missing = [key for key in required if key not in manifest]
    if missing:
        raise ValueError(f"{path}: not a readable checkpoint manifest (no {', '.join(missing)})")
    return manifest


def check_fits(directory: Path, manifest: dict, num_classes: int, embedding_dim: int) -> None:
    """ValueError unless the checkpoint has the run's class count and embedding dimension."""
    path = Path(directory) / MANIFEST
    if manifest["num_classes"] != num_classes:
        raise ValueError(f"{path}: checkpoint has {manifest['num_classes']} classes but the "
                         f"dataset has {num_classes}; resume with the dataset it was trained on")
    if manifest["embedding_dim"] != embedding_dim:
        raise ValueError(f"{path}: checkpoint has embedding dimension "
                         f"{manifest['embedding_dim']} but model.embedding_dim={embedding_dim}; "
                         f"resume with the same model.embedding_dim")


def read_rows(directory: Path, manifest: dict, start: int, stop: int,
              names: tuple[str, ...] = ("weight",), dtype=np.float32) -> dict[str, np.ndarray]:
    """Rows [start, stop) of the named classifier arrays, re-partitioned from the saved ranges
    that overlap them (any old world size); values copied bit for bit into `dtype` arrays."""
    import h5py  # noqa: PLC0415

    directory, dim = Path(directory), int(manifest["embedding_dim"])
    out = {name: np.empty((stop - start, dim), dtype=dtype) for name in names}
    filled = 0
    for entry in manifest["classifier"]:
        lo, hi = max(int(entry["start"]), start), min(int(entry["stop"]), stop)
        if lo >= hi:
            continue
        path = directory / entry["file"]
        try:
            with h5py.File(path, "r") as f:
                for name in names:
                    saved = f[name]
                    if saved.ndim != 2 or saved.shape[1] != dim:
                        raise ValueError(f"{path}: classifier /{name} of shape {saved.shape}, "
                                         f"the manifest says dimension {dim}")
                    out[name][lo - start:hi - start] = saved[lo - entry["start"]:
                                                             hi - entry["start"]]
        except (OSError, KeyError) as exc:
            raise ValueError(f"{path}: cannot read classifier rows ({exc}); the checkpoint is "
                             f"damaged, use an older one") from None
        filled += hi - lo
    if filled != stop - start:
        raise ValueError(f"{directory}: the checkpoint covers {filled} of the classes "
                         f"[{start}, {stop})")
    return out


def restore(directory: Path, num_classes: int, embedding_dim: int, classifier) -> tuple[dict, dict]:
    """(manifest, trainer state) of a checkpoint checked against the run, with this rank's
    classifier rows and momentum loaded (re-partitioned for the current world size)."""
    manifest = read_manifest(directory, RESUME_KEYS)
    check_fits(directory, manifest, num_classes, embedding_dim)
    dtype = classifier.weight_cD.numpy().dtype
    classifier.load_state_arrays(read_rows(directory, manifest, classifier.start, classifier.stop,
                                           ("weight", "momentum"), dtype))
    return manifest, load_trainer_state(directory, manifest)


def load_trainer_state(directory: Path, manifest: dict) -> dict:
    """The replicated trainer state (plain tensors and numbers; no code is unpickled)."""
    return _load_plain(Path(directory) / manifest["trainer_state"], "trainer state")


def read_rank_states(directory: Path, manifest: dict, rank: int, size: int) -> list[dict]:
    """The per-rank states (`rank_states` in the manifest) for `rank` of a `size`-rank run:
    those of the old ranks r' with r' mod size == rank, i.e. its own on the same world size
    (none when the checkpoint has none). ValueError naming a missing or damaged file."""
    files = manifest.get("rank_states", [])
    return [_load_plain(Path(directory) / name, "per-rank state")
            for old, name in enumerate(files) if old % size == rank]


def _load_plain(path: Path, what: str) -> dict:
    """A torch file of plain tensors and numbers (no code is unpickled)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: cannot read {what} ({first}); the checkpoint is "
                         f"damaged, use an older one") from None


def rng_state() -> dict:
    """The process's torch and numpy RNG states as plain tensors and numbers."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["key"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
