"""Starting a run from an earlier run: `python -m app.train --init-from RUN_OR_CHECKPOINT`.

The source is a run directory (its newest complete checkpoint) or a checkpoint directory. The
new run's dataset must be the old run's dataset (same classes.tsv sha256) or a version grown
from it (`data_prep.lineage.descends_from`), with the old run's class keys as ids 0..C_old-1
of the new classes.tsv. The new run takes from the checkpoint the backbone weights and the rows
of the known classes (any old and new number of ranks, `checkpoint.read_rows`), and with
`model.keep_row_momentum` their classifier momentum; it starts its own step count (0),
schedule and backbone optimizer state. The new classes' rows start at their class centres under
the loaded backbone (`model.new_rows=centres`, the centre pass of app/classifier/centres.py) or
random. In knn mode the first graph is built over all rows.

Phases, as the trainer's (app/training/trainer.py): `check_source` runs on rank 0 only (it reads
the old run's config.yaml and both classes.tsv) and every rank follows its decision
(`decide_on_root`); `load_rows` runs on every rank inside `agree`; `new_rows_and_graph` is
collective and runs when training starts. Every refusal is one line naming the file or key.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from app import checkpoint
from app.classifier.centres import imprint, train_centres
from app.config import load_config
from common.files import write_text_atomic
from data_prep.format import (CLASSES_NAME, Ancestor, DatasetError, load_dataset_info,
                              read_classes)
from data_prep.lineage import ancestor_of, descends_from
from mpi.agree import agree, decide_on_root

RECORD = "init_from.json"
# The model.* keys that decide the backbone's architecture, per backbone.
ARCH_KEYS = {"mlp": ("backbone", "embedding_dim", "mlp_hidden", "mlp_layers"),
             "resnet": ("backbone", "embedding_dim", "resnet_blocks", "resnet_width")}


@dataclass(frozen=True)
class Source:
    """The checkpoint a run starts from: its directory, step, class count C_old, and how the
    new dataset relates to the old one (words, for the log)."""

    checkpoint: str
    step: int
    num_old: int
    relation: str


def check_unused(cfg) -> None:
    """ValueError naming the key for an init-from key set in a run without --init-from."""
    for key, value, default in (("new_rows", cfg.model.new_rows, "centres"),
                                ("keep_row_momentum", cfg.model.keep_row_momentum, False)):
        if value != default:
            raise ValueError(f"model.{key}: {value!r} is used only by a run started with "
                             f"--init-from; remove the key or pass --init-from")


def check_config(cfg) -> None:
    """ValueError for a key that --init-from would not use."""
    if cfg.model.classifier_init != "auto":
        raise ValueError(f"model.classifier_init: {cfg.model.classifier_init!r} is not used with "
                         f"--init-from (known rows come from the checkpoint, new rows follow "
                         f"model.new_rows); remove the key")


def start(trainer, given: str) -> Source:
    """Collective, after `open_run_dir`: rank 0 checks the source, every rank loads it."""
    source = decide_on_root(trainer.world, lambda: check_source(trainer.cfg, given))
    agree(trainer.world, lambda: load_rows(trainer, source))
    trainer.log.info("--init-from %s (step %d, %d known classes of %d): the dataset is %s",
                     source.checkpoint, source.step, source.num_old,
                     trainer.classifier.num_classes, source.relation)
    return source


def resolve(given: str) -> Path:
    """The checkpoint directory that `--init-from given` names."""
    path = Path(given)
    if (path / checkpoint.MANIFEST).is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"--init-from {given}: no such run or checkpoint directory")
    if path.name.startswith("step-"):
        raise ValueError(f"--init-from {given}: an incomplete checkpoint (no "
                         f"{checkpoint.MANIFEST}); name a complete one or its run directory")
    return checkpoint.find_checkpoint(path)


def check_source(cfg, given: str) -> Source:
    """Rank 0: the checkpoint `given` names, checked against the run (ValueError, one line)."""
    directory = resolve(given)
    manifest = checkpoint.read_manifest(directory, checkpoint.ROWS_KEYS + ("trainer_state",))
    run_dir = directory.parent.parent
    try:
        old_cfg = load_config(str(run_dir / "config.yaml"), [])
    except ValueError as exc:
        raise ValueError(f"--init-from {given}: the run's config cannot be used ({exc}); "
                         f"name a checkpoint inside a run directory") from None
    _check_model(directory, manifest, run_dir, old_cfg.model, cfg.model)
    num_old, relation = _check_dataset(run_dir, old_cfg.data.path, manifest, cfg.data.path)
    return Source(str(directory), int(manifest["step"]), num_old, relation)


def _check_model(directory: Path, manifest: dict, run_dir: Path, old, new) -> None:
    if manifest["embedding_dim"] != new.embedding_dim:
        raise ValueError(f"{directory / checkpoint.MANIFEST}: checkpoint has embedding dimension "
                         f"{manifest['embedding_dim']} but model.embedding_dim="
                         f"{new.embedding_dim}; --init-from needs the same dimension")
    for key in ARCH_KEYS[old.backbone]:
        if getattr(old, key) != getattr(new, key):
            raise ValueError(f"{run_dir / 'config.yaml'}: model.{key}={getattr(old, key)!r} "
                             f"there but {getattr(new, key)!r} here; --init-from needs the same "
                             f"backbone (set model.{key}={getattr(old, key)!r})")


def _old_dataset(run_dir: Path, old_path: str, manifest: dict) -> tuple[Ancestor, bool]:
    """The checkpoint's dataset as a lineage entry, and whether its classes.tsv is there to read.
    Where the old dataset has moved or is gone, the checkpoint manifest's `dataset` record
    (sha256 and class count of its classes.tsv) stands for it."""
    recorded = manifest.get("dataset")
    num_saved = int(manifest["num_classes"])
    try:
        old = ancestor_of(old_path, load_dataset_info(old_path))
    except DatasetError as exc:
        if not recorded:
            raise ValueError(f"{run_dir / 'config.yaml'}: the run's dataset data.path={old_path} "
                             f"cannot be checked ({exc})") from None
        return Ancestor(recorded["path"], recorded["classes_sha256"], num_saved), False
    if recorded and recorded["classes_sha256"] != old.classes_sha256:
        raise ValueError(f"{Path(old_path) / CLASSES_NAME}: changed since the checkpoint was "
                         f"written (sha256 {old.classes_sha256[:12]}... there, "
                         f"{recorded['classes_sha256'][:12]}... in its manifest); the run's "
                         f"data.path was rebuilt or replaced")
    if old.num_classes != num_saved:
        raise ValueError(f"{run_dir}: its checkpoint has {num_saved} classes but its dataset "
                         f"{old_path} has {old.num_classes}; the run's data.path was changed")
    return old, True


def _check_dataset(run_dir: Path, old_path: str, manifest: dict, new_path: str) -> tuple[int, str]:
    """(C_old, the relation in words) of the old run's dataset and the new one."""
    old, readable = _old_dataset(run_dir, old_path, manifest)
    new_info = load_dataset_info(new_path)
    new = ancestor_of(new_path, new_info)
    if new.classes_sha256 == old.classes_sha256:
        return old.num_classes, f"the run's own dataset {old_path} (same classes.tsv)"
    ok, why = descends_from(new_info, old)
    if not ok:
        raise ValueError(f"{Path(new_path) / 'dataset.json'}: data.path does not descend from "
                         f"the dataset {old_path} of {run_dir}: {why}; build it with "
                         f"--grow-from {old_path}")
    if not readable:  # the lineage entry's sha256 is that classes.tsv: --grow-from kept its ids
        return old.num_classes, (f"{why} (checked by the sha256 the checkpoint records: "
                                 f"{old_path} is not there to read)")
    old_keys, _ = read_classes(old_path, old.num_classes)
    new_keys, _ = read_classes(new_path, new_info.num_classes)
    for i, key in enumerate(old_keys):
        if i >= len(new_keys) or new_keys[i] != key:
            now = repr(new_keys[i]) if i < len(new_keys) else "missing"
            raise ValueError(f"{Path(new_path) / 'classes.tsv'}: class {i} is {now} but "
                             f"{old_path}'s class {i} is {key!r}: the run's classes must keep "
                             f"their ids; rebuild it with --grow-from {old_path}")
    return old.num_classes, why


def load_rows(trainer, source: Source) -> None:
    """This rank's part: the backbone, the known rows in its class range (and their momentum
    with model.keep_row_momentum). New rows and the backbone optimizer stay as built."""
    directory = Path(source.checkpoint)
    manifest = checkpoint.read_manifest(directory, checkpoint.ROWS_KEYS + ("trainer_state",))
    state = checkpoint.load_trainer_state(directory, manifest)
    try:
        trainer.backbone.load_state_dict(state["backbone"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"{directory / checkpoint.TRAINER_STATE}: the saved backbone does not "
                         f"fit the config's model.* ({first}); --init-from needs the same "
                         f"backbone") from None
    clf = trainer.classifier
    lo, hi = clf.start, min(clf.stop, source.num_old)
    if lo >= hi:
        return
    names = ("weight", "momentum") if trainer.cfg.model.keep_row_momentum else ("weight",)
    arrays = checkpoint.read_rows(directory, manifest, lo, hi, names,
                                  clf.weight_cD.numpy().dtype)
    clf.weight_cD[:hi - lo].copy_(torch.from_numpy(arrays["weight"]))
    if "momentum" in arrays:
        clf.optimizer.momentum_cD[:hi - lo].copy_(torch.from_numpy(arrays["momentum"]))


def new_rows_and_graph(trainer) -> float:
    """Collective, at the start of training: the new rows at their class centres under the
    loaded backbone (model.new_rows=centres; known rows untouched), then in knn mode the first
    graph over all rows (random with knn.init=random). Returns the graph's seconds."""
    cfg, clf, num_old = trainer.cfg, trainer.classifier, trainer.started_from.num_old
    if cfg.model.new_rows == "centres" and num_old < clf.num_classes:
        centres_cD = train_centres(trainer.world, cfg, trainer.backbone, clf, trainer.dtype)
        known = max(0, min(clf.stop, num_old) - clf.start)
        centres_cD[:known] = clf.weight_cD[:known]  # imprint keeps a row equal to its centre
        imprint(clf, centres_cD)
    if trainer.graphs is None or clf.graph is not None:
        return 0.0
    if cfg.knn.init == "random":
        return trainer.graphs.build(0, clf, None, "initial")
    return trainer.graphs.build(0, clf, clf.weight_cD, "initial over the loaded and new rows")


def write_record(run_dir: Path, source: Source) -> None:
    """Rank 0: `run_dir/init_from.json` (checkpoint, step, known classes, relation)."""
    write_text_atomic(Path(run_dir) / RECORD, json.dumps(asdict(source), indent=1) + "\n")


def read_record(run_dir: Path) -> Source | None:
    """The record of a run started with --init-from (None for another run)."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return None
    try:
        return Source(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable init-from record ({exc}); restore it or use "
                         f"another out_dir") from None
