"""The predictions file of `python -m app.predict` (rank 0 writes it): one line per input and
rank, in input order, as JSON lines ({"input", "rank", "key", "id", "score"}) or TSV with the
header "input rank key id score". Written as FILE.tmp and renamed at the end, so FILE is never
half-written and an existing FILE is replaced only by a complete one.

Legend: N = inputs of a batch, k = ranks per input.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

FORMATS = ("jsonl", "tsv")
TSV_HEADER = "input\trank\tkey\tid\tscore"


def output_format(path: Path, given: str | None) -> str:
    """`given`, or tsv for a .tsv file and JSON lines otherwise."""
    if given:
        return given
    return "tsv" if Path(path).suffix.lower() in (".tsv", ".tab") else "jsonl"


class PredictionWriter:
    """Appends batches of predictions to FILE.tmp; `close()` renames it to FILE."""

    def __init__(self, path: Path, fmt: str, keys: np.ndarray):
        self.path, self.fmt, self.keys = Path(path), fmt, keys
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.file = open(self.tmp, "w", encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"{self.path}: cannot be written ({exc.strerror}); pass a "
                             f"writable --out") from None
        if fmt == "tsv":
            self.file.write(TSV_HEADER + "\n")

    def write(self, names: list[str], scores_Nk: torch.Tensor, ids_Nk: torch.Tensor) -> None:
        lines = []
        for name, scores, ids in zip(names, scores_Nk.tolist(), ids_Nk.tolist()):
            for rank, (score, cid) in enumerate(zip(scores, ids), 1):
                if cid < 0:  # fewer classes than --top-k
                    break
                key = self.keys[cid].decode()
                if self.fmt == "tsv":
                    lines.append(f"{name}\t{rank}\t{key}\t{cid}\t{score:.7g}\n")
                else:
                    lines.append(json.dumps({"input": name, "rank": rank, "key": key,
                                             "id": cid, "score": round(score, 7)}) + "\n")
        self.file.write("".join(lines))

    def abandon(self) -> None:
        """Drops FILE.tmp (FILE is left as it was)."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def close(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.path)


def read_predictions(path: Path) -> list[dict]:
    """The records of a predictions file of either format (tests, users' scripts)."""
    text = Path(path).read_text(encoding="utf-8").splitlines()
    if text and text[0] == TSV_HEADER:
        out = []
        for line in text[1:]:
            name, rank, key, cid, score = line.split("\t")
            out.append({"input": name, "rank": int(rank), "key": key, "id": int(cid),
                        "score": float(score)})
        return out
    return [json.loads(line) for line in text if line.strip()]
