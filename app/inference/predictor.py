"""The prediction loop of `python -m app.predict`, in one process or under mpirun.

Every rank loads the backbone and its part of the classes: with `exact` search the rows of its
class range (`class_range`: any number of ranks, whatever the model's row files), with `index`
search the index files i with i % P == rank. Inputs go in global batches of P x batch: rank r
reads and embeds the r-th slice, the features of all ranks are gathered, every rank searches
its classes for all of them, the candidates are merged (`global_search`) and rank 0 writes the
results in input order. Images that cannot be decoded are skipped and reported by rank 0.

Legend: b = this rank's inputs of a batch, N = all ranks' inputs of a batch, D = embedding
dim, k = classes asked for.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from app.inference import model_dir as md
from app.inference.search import ExactSearcher, IndexSearcher, global_search
from app.model import as_input
from mpi import collectives
from mpi.agree import agree
from mpi.partition import class_range

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclasses.dataclass
class LoadedModel:
    """One rank's part of an exported model."""

    manifest: dict
    backbone: torch.nn.Module
    searcher: object
    dtype: torch.dtype


def load_model(world, model_dir: Path, manifest: dict, search: str, nprobe: int) -> LoadedModel:
    """This rank's backbone and searcher (no communication; ValueError naming the file)."""
    backbone = md.load_backbone(model_dir, manifest)
    dtype = TORCH_DTYPES[manifest["dtype"]]
    if search == "exact":
        from app import checkpoint  # noqa: PLC0415

        start, stop = class_range(manifest["num_classes"], world.rank, world.size)
        rows = checkpoint.read_rows(model_dir, manifest, start, stop, ("weight",),
                                    np.dtype(manifest["dtype"]))["weight"]
        searcher = ExactSearcher(torch.from_numpy(rows), start, manifest["logit"])
    else:
        searcher = IndexSearcher(_load_index_shards(world, model_dir, manifest),
                                 manifest["logit"], nprobe or manifest["index"]["nprobe"])
    return LoadedModel(manifest, backbone, searcher, dtype)


def _load_index_shards(world, model_dir: Path, manifest: dict) -> list:
    import faiss  # noqa: PLC0415

    if not manifest["index"]:
        raise ValueError(f"{model_dir / md.MANIFEST}: the model was exported without an index "
                         f"(--index none); use --search exact or export it again")
    faiss.omp_set_num_threads(max(1, int(world.threads)))
    shards = []
    for i, entry in enumerate(manifest["index"]["files"]):
        if i % world.size != world.rank:
            continue
        path = model_dir / entry["file"]
        try:
            shards.append((faiss.read_index(str(path)), int(entry["start"])))
        except RuntimeError as exc:
            raise ValueError(f"{path}: cannot read the index ({str(exc).splitlines()[0]}); "
                             f"export the model again") from None
    return shards


@torch.no_grad()
def embed(model: LoadedModel, x) -> torch.Tensor:
    if len(x) == 0:
        return torch.empty((0, model.manifest["embedding_dim"]), dtype=model.dtype)
    return model.backbone(as_input(x, model.dtype))


def predict(world, model: LoadedModel, source, k: int, batch_size: int, writer, bar,
            log) -> tuple[int, list]:
    """Collective: predicts every input of `source` (rank 0 writes through `writer`); returns
    (inputs predicted, (name, reason) of those skipped)."""
    num, num_done, skipped = len(source.names), 0, []
    step = batch_size * world.size
    for first in range(0, num, step):
        lo = min(num, first + world.rank * batch_size)
        hi = min(num, lo + batch_size)
        x, names, missed = agree(world, lambda: source.read(lo, hi))
        _, scores_Nk, ids_Nk = global_search(world, model.searcher, embed(model, x), k,
                                             model.manifest["num_classes"])
        per_rank = collectives.allgather_object(world, (names, missed))
        all_names = [n for names_r, _ in per_rank for n in names_r]
        for _, missed_r in per_rank:
            for name, reason in missed_r if world.is_root else ():
                log.warning("skipped %s: %s", name, reason)
            skipped += missed_r
        if world.is_root:
            writer.write(all_names, scores_Nk, ids_Nk)
        num_done += len(all_names)
        bar.update(min(step, num - first))
    return num_done, skipped
