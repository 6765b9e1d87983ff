"""Atomic file writes: a reader (another rank, a resumed run, a user's tool) sees the old file or
the new one, never half of one. Every writer in the project goes through here.

The new content is written to `NAME.tmp` beside the target and renamed over it with
`os.replace` (atomic on POSIX within one file system); a failed write removes the `.tmp`.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def tmp_path(path: str | os.PathLike) -> Path:
    """The temporary name a file is written under before it replaces `path`."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields the temporary path to write (with any library: h5py, torch.save, open); on a clean
    exit it replaces `path`, on an exception it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def publish(path: str | os.PathLike) -> None:
    """Rename the finished `tmp_path(path)` over `path`: the last step of a write that cannot
    be one `atomic_path` block (several ranks fill the temporary file, one renames it)."""
    path = Path(path)
    os.replace(tmp_path(path), path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any, **dumps_kwargs) -> None:
    """`obj` as JSON (json.dumps keyword arguments pass through; indent 1 by default)."""
    dumps_kwargs.setdefault("indent", 1)
    write_text_atomic(path, json.dumps(obj, **dumps_kwargs))
