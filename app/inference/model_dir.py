"""The exported model directory (`python -m app.export`, read by `python -m app.predict`):
everything needed to predict, without the run, its dataset or its config.

Layout of MODEL_DIR/:
  manifest.json            written LAST (the directory itself appears by one atomic rename):
                           format, source checkpoint, classes, embedding dim, dtype, logit,
                           input kind and shape, preprocessing, the backbone's config, the row
                           files, the index and its recall against exact search, and the
                           sha256 and size of every other file
  backbone.pt              the backbone's state dict: plain tensors (torch.load weights_only=True)
  classes.tsv              "id<TAB>key", one line per class id 0..C-1
  rows/rows-START-STOP.h5  classifier rows [START, STOP) as trained (`/weight`, float32 or
                           float64, C_r x D); one file, or several for models too big for one
  index/ivf-START-STOP.faiss  (when exported with an index) a faiss index over the same rows,
                           normalised for cosine logits; ids are local to the file's range

The row entries have the shape of a checkpoint's (`start`, `stop`, `file`), so
`app.checkpoint.read_rows` reads any class range of them on any number of ranks.

Legend: c = classes of one range, D = embedding dim.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from data_prep.format import sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BACKBONE = "backbone.pt"
CLASSES = "classes.tsv"
CLASSES_HEADER = "id\tkey"
# Files at most this large are hashed every time a model is loaded; larger ones (rows, index)
# are checked by size, and hashed only with `verify=True` (`app.predict --verify`).
ALWAYS_HASH_BYTES = 64 << 20
REQUIRED = ("format_version", "num_classes", "embedding_dim", "dtype", "logit", "input",
            "model", "rows", "files", "index")


def rows_file(start: int, stop: int) -> str:
    return f"rows/rows-{start:010d}-{stop:010d}.h5"


def index_file(start: int, stop: int) -> str:
    return f"index/ivf-{start:010d}-{stop:010d}.faiss"


def file_entry(directory: Path, rel: str) -> dict:
    path = Path(directory) / rel
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _fail(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}; export the model again (python -m app.export)")


def read_manifest(model_dir: str | os.PathLike) -> dict:
    """The manifest of a model directory, checked for format and keys; ValueError (one line
    naming the file) for a missing or damaged one."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir}: no such model directory; pass the --out of "
                         f"python -m app.export")
    path = model_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError as exc:
        raise _fail(path, f"cannot read the model manifest ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(path, f"not a readable model manifest ({exc})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise _fail(path, f"model format {version}, this version reads {FORMAT_VERSION}")
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise _fail(path, f"not a complete model manifest (no {', '.join(missing)})")
    # app.checkpoint.read_rows reads the rows through these two keys.
    manifest["classifier"] = manifest["rows"]
    return manifest


def check_files(model_dir: str | os.PathLike, manifest: dict, verify: bool = False) -> None:
    """Every file the manifest lists exists with its size; small files (and with `verify` all)
    have their sha256. ValueError naming the first damaged file."""
    model_dir = Path(model_dir)
    for rel, entry in sorted(manifest["files"].items()):
        path = model_dir / rel
        if not path.is_file():
            raise _fail(path, "missing from the model directory")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise _fail(path, f"{size} bytes, the manifest says {entry['bytes']} (damaged)")
        if (verify or size <= ALWAYS_HASH_BYTES) and sha256_file(path) != entry["sha256"]:
            raise _fail(path, "checksum differs from the manifest (damaged)")


def load_backbone(model_dir: str | os.PathLike, manifest: dict):
    """The backbone in eval mode with the exported weights (read with weights_only=True)."""
    import pickle  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from app.backbones import build_backbone  # noqa: PLC0415
    from app.config import ModelConfig  # noqa: PLC0415

    path = Path(model_dir) / BACKBONE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        backbone = build_backbone(ModelConfig(**manifest["model"]),
                                  tuple(manifest["input"]["shape"]))
        backbone = backbone.to(getattr(torch, manifest["dtype"]))
        backbone.load_state_dict(state)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _fail(path, f"cannot load the backbone ({first})") from None
    return backbone.eval()


def write_classes(path: Path, keys: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(CLASSES_HEADER + "\n")
        for start in range(0, len(keys), 65536):
            f.write("".join(f"{i}\t{keys[i]}\n"
                            for i in range(start, min(start + 65536, len(keys)))))


def read_keys(model_dir: str | os.PathLike, num_classes: int) -> np.ndarray:
    """Class keys by id as a numpy bytes array (C x longest key: 10^8 keys stay compact)."""
    path = Path(model_dir) / CLASSES
    keys = []
    with open(path, encoding="utf-8") as f:
        if f.readline().rstrip("\n") != CLASSES_HEADER:
            raise _fail(path, f"header must be {CLASSES_HEADER!r}")
        for line in f:
            keys.append(line.rstrip("\n").split("\t", 1)[-1].encode())
    if len(keys) != num_classes:
        raise _fail(path, f"lists {len(keys)} classes, the manifest says {num_classes}")
    return np.array(keys, dtype=bytes)
