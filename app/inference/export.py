"""Export of a run's checkpoint into a model directory (layout in app/inference/model_dir.py).

The directory is written under OUT.tmp and renamed to OUT when complete (the manifest, with
the checksums of every other file, is its last file), so OUT is either absent or whole. An
existing OUT is refused, never overwritten. A damaged checkpoint (unreadable manifest, rows or
trainer state) is refused with one line naming the file.

Legend: c = classes of one range, D = embedding dim, N = recall queries.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from app.inference import index as ivf
from app.inference import model_dir as md
from app.inference.search import ExactSearcher, IndexSearcher, merge_topk

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclasses.dataclass(frozen=True)
class IndexOptions:
    """kind: ivf | ivf-fp16 | ivf-pq4 | hnsw | none; nlist: IVF lists per row file (0: about 4
    sqrt(rows)); nprobe: lists scanned, or HNSW efSearch (0: the smallest of the search steps
    reaching `target_recall` at 1)."""

    kind: str = "ivf"
    nlist: int = 0
    nprobe: int = 0
    target_recall: float = 0.95
    seed: int = 0


@dataclasses.dataclass
class Source:
    """What an export reads: a checkpoint and the run's config and dataset."""

    checkpoint: Path
    manifest: dict
    backbone_state: dict
    model_cfg: dict
    logit: str
    input_kind: str
    input_shape: tuple
    keys: list
    data_path: str


def load_source(run_dir: Path, step: int | None, data: str | None) -> Source:
    """The checkpoint (newest complete one, or step `step`), the run's config and the class keys
    of its dataset; ValueError naming the file for anything missing or damaged."""
    from app import checkpoint  # noqa: PLC0415
    from app.config import load_config  # noqa: PLC0415
    from data_prep.format import load_dataset_info, read_classes  # noqa: PLC0415

    run_dir = Path(run_dir)
    given = checkpoint.step_dir(run_dir, step) if step is not None else None
    directory = checkpoint.find_checkpoint(run_dir, given)
    if not (directory / checkpoint.MANIFEST).is_file():
        raise ValueError(f"{directory}: no complete checkpoint of step {step}; pick a step "
                         f"under {run_dir / 'checkpoints'}")
    manifest = checkpoint.read_manifest(directory)
    state = checkpoint.load_trainer_state(directory, manifest)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"{config_path}: not found; --run must name a run directory")
    cfg = load_config(str(config_path), [f"data.path={data}"] if data else [])
    info = load_dataset_info(cfg.data.path)
    if info.num_classes != manifest["num_classes"]:
        raise ValueError(f"{Path(cfg.data.path) / 'dataset.json'}: {info.num_classes} classes "
                         f"but the checkpoint has {manifest['num_classes']}; pass --data with "
                         f"the dataset the run was trained on")
    keys, _ = read_classes(cfg.data.path, info.num_classes)
    if "backbone" not in state:
        raise ValueError(f"{directory / manifest['trainer_state']}: no backbone state; the "
                         f"checkpoint is damaged, use an older one")
    return Source(directory, manifest, state["backbone"], dataclasses.asdict(cfg.model),
                  cfg.softmax.logit, info.kind, tuple(info.input_shape), keys, cfg.data.path)


def preprocessing(kind: str, shape: tuple) -> dict:
    """How raw inputs become the backbone's input (recorded in the manifest)."""
    if kind == "images":
        return {"kind": "images", "size": int(shape[0]), "steps": [
            "decode with Pillow (EXIF orientation applied), RGB",
            f"shorter side resized and centre-cropped to {shape[0]} x {shape[1]} (bicubic; "
            f"data_prep.images.load_image, as data_prep.build_shards)",
            "uint8 H x W x 3 into the backbone, which scales pixels to [-1, 1]"]}
    return {"kind": "vectors", "dim": int(shape[0]), "steps": ["float vectors as they are"]}


def ranges(num_classes: int, rows_per_file: int) -> list[tuple[int, int]]:
    step = max(1, rows_per_file)
    return [(lo, min(lo + step, num_classes)) for lo in range(0, num_classes, step)] or [(0, 0)]


def write_rows_and_index(out: Path, source: Source, rows_per_file: int, options: IndexOptions,
                         log) -> tuple[list[dict], list[dict]]:
    """Row files (and index files) range by range: one range of rows in memory at a time."""
    from app import checkpoint  # noqa: PLC0415
    from common.files import atomic_path  # noqa: PLC0415
    import faiss  # noqa: PLC0415
    import h5py  # noqa: PLC0415

    manifest, rows, indexes = source.manifest, [], []
    dtype = np.dtype(manifest.get("dtype", "float32"))
    for lo, hi in ranges(manifest["num_classes"], rows_per_file):
        weight_cD = checkpoint.read_rows(source.checkpoint, manifest, lo, hi, ("weight",),
                                         dtype)["weight"]
        rel = md.rows_file(lo, hi)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / rel) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("weight", data=weight_cD)
            f.attrs.update(start=lo, stop=hi)
        rows.append({"start": lo, "stop": hi, "file": rel})
        if options.kind != "none":
            nlist = options.nlist or ivf.default_nlist(hi - lo)
            start_time = time.perf_counter()
            index = ivf.build_index(options.kind, weight_cD, source.logit, nlist, options.seed)
            rel = md.index_file(lo, hi)
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            faiss.write_index(index, str(out / rel))
            nlist = ivf.num_lists(index)  # 0: HNSW
            indexes.append({"start": lo, "stop": hi, "file": rel, "nlist": nlist,
                            "bytes_in_memory": ivf.index_bytes(index)})
            log.info("index of classes [%d, %d): %s nlist=%d in %.1f s", lo, hi, options.kind,
                     nlist, time.perf_counter() - start_time)
    return rows, indexes


def exact_topk(out: Path, rows: list[dict], logit: str, dtype, feat_ND: torch.Tensor,
               k: int) -> torch.Tensor:
    """Exact top-k ids of the queries over all row files, one file in memory at a time."""
    import h5py  # noqa: PLC0415

    vals, ids = None, None
    for entry in rows:
        with h5py.File(out / entry["file"], "r") as f:
            rows_cD = torch.from_numpy(f["weight"][:]).to(dtype)
        v, i = ExactSearcher(rows_cD, entry["start"], logit).search(feat_ND, k)
        vals, ids = (v, i) if vals is None else merge_topk(vals, ids, v, i, k)
    return ids


def choose_nprobe(out: Path, rows: list[dict], indexes: list[dict], logit: str, dtype,
                  queries_ND: torch.Tensor, options: IndexOptions) -> dict:
    """The index section of the manifest: nprobe (given, or the smallest step reaching the
    target recall@1 on the queries) and the recall measured with it."""
    import faiss  # noqa: PLC0415

    exact_Nk = exact_topk(out, rows, logit, dtype, queries_ND, 5)
    shards = [(faiss.read_index(str(out / e["file"])), e["start"]) for e in indexes]
    max_lists = max(e["nlist"] for e in indexes)
    steps = [options.nprobe] if options.nprobe else ivf.search_steps(options.kind, max_lists)
    for nprobe in steps:
        _, found_Nk = IndexSearcher(shards, logit, nprobe).search(queries_ND, 5)
        measured = ivf.recall(exact_Nk, found_Nk)
        if measured["at_1"] >= options.target_recall:
            break
    return {"kind": options.kind, "metric": "inner product" + (
        " of normalised rows (cosine)" if logit == "cosine" else ""), "nprobe": int(nprobe),
        "target_recall_at_1": options.target_recall, "files": indexes,
        "recall": measured, "bytes_in_memory": sum(e["bytes_in_memory"] for e in indexes)}


def finish_manifest(out: Path, source: Source, rows: list[dict], index_section: dict | None,
                    query_source: str) -> dict:
    files = [md.BACKBONE, md.CLASSES] + [e["file"] for e in rows] + \
        [e["file"] for e in (index_section or {}).get("files", [])]
    if index_section:
        index_section["recall"]["query_source"] = query_source
    src = source.manifest
    return {
        "format_version": md.FORMAT_VERSION, "num_classes": src["num_classes"],
        "embedding_dim": src["embedding_dim"], "dtype": src.get("dtype", "float32"),
        "logit": source.logit, "input": {"kind": source.input_kind,
                                         "shape": list(source.input_shape)},
        "preprocessing": preprocessing(source.input_kind, source.input_shape),
        "model": source.model_cfg, "rows": rows, "index": index_section,
        "source": {"checkpoint": str(source.checkpoint.resolve()), "step": src["step"]},
        "files": {rel: md.file_entry(out, rel) for rel in files},
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def prepare_out(out: Path) -> Path:
    """OUT.tmp, empty; ValueError when OUT exists (nothing is overwritten)."""
    if out.exists():
        raise ValueError(f"{out}: already exists; remove it or choose another --out")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed export left
    tmp.mkdir(parents=True)
    return tmp


@torch.no_grad()
def recall_queries(source: Source, backbone, num: int, seed: int) -> tuple[torch.Tensor, str]:
    """Up to `num` features of the run's val split (train split when val is empty; a seeded
    random sample): the queries the recall is measured on, as the model will see them."""
    from data_prep.format import load_dataset_info  # noqa: PLC0415
    from data_prep.reader import ShardedReader  # noqa: PLC0415
    from app.model import as_input  # noqa: PLC0415

    dtype = next(backbone.parameters()).dtype
    feats, seen = [], 0
    split = "val" if load_dataset_info(source.data_path).splits["val"].num_samples else "train"
    with ShardedReader(source.data_path, split, 0, 1, 256, seed, shuffle=True, drop_last=False,
                       prefetch=0) as reader:
        for batch in reader.one_epoch():
            feats.append(backbone(as_input(batch.inputs, dtype)))
            seen += len(batch.labels)
            if seen >= num:
                break
    return torch.cat(feats)[:num], f"{min(seen, num)} features of the {split} split of " \
                                   f"{source.data_path}"


def export_model(source: Source, out: Path, rows_per_file: int, options: IndexOptions,
                 num_queries: int, log) -> dict:
    """Writes the model directory OUT (via OUT.tmp and one rename); returns its manifest."""
    from common.files import write_json_atomic  # noqa: PLC0415
    from app.backbones import build_backbone  # noqa: PLC0415
    from app.config import ModelConfig  # noqa: PLC0415

    tmp = prepare_out(out)
    dtype = TORCH_DTYPES[source.manifest.get("dtype", "float32")]
    backbone = build_backbone(ModelConfig(**source.model_cfg), source.input_shape).to(dtype)
    try:
        backbone.load_state_dict(source.backbone_state)
    except RuntimeError as exc:
        raise ValueError(f"{source.checkpoint / source.manifest['trainer_state']}: the backbone "
                         f"state does not fit the run's model config ({str(exc).splitlines()[0]})"
                         ) from None
    torch.save(backbone.state_dict(), tmp / md.BACKBONE)
    md.write_classes(tmp / md.CLASSES, source.keys)
    rows, indexes = write_rows_and_index(tmp, source, rows_per_file, options, log)
    index_section, query_source = None, ""
    if options.kind != "none":
        queries_ND, query_source = recall_queries(source, backbone.eval(), num_queries,
                                                  options.seed)
        index_section = choose_nprobe(tmp, rows, indexes, source.logit, dtype, queries_ND,
                                      options)
    manifest = finish_manifest(tmp, source, rows, index_section, query_source)
    write_json_atomic(tmp / md.MANIFEST, manifest, sort_keys=True)
    tmp.rename(out)
    return manifest
