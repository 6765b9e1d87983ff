"""Typed run configuration: one frozen dataclass per component, loaded once and never mutated.

`load_config(path, overrides)` merges, in this order, the defaults below, a YAML file and dotted
`--set key=value` overrides, validates everything once and returns a `Config`. Every problem is
a `ValueError` with one line naming the key (or file), the offending value and what is allowed.
Each component is handed only its own section (`build_backbone(cfg.model, ...)`), so sections
do not refer to each other; numbers derived from several sections (global batch, classes per
rank, pairs per step) belong in the run plan, not here.

The key names are contracts (docs/design.md, "Contracts"): extend them, never rename them.

Config files are plain YAML mappings that mirror the dataclasses:

    train:
      steps: 600
      batch_size: 128
    softmax: {mode: knn, k: 64}

Values may use OmegaConf interpolation (`out_dir: runs/${softmax.mode}`); `Config` holds the
resolved values, and `config_to_yaml` writes them resolved.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any

from app.config_sections import (CommConfig, KnnConfig, SoftmaxConfig, _check_at_least,
                                 _check_choice, _check_fraction, _check_momentum,
                                 _check_not_empty, _fail)

# yaml and omegaconf are imported where files are read and written (load_config,
# config_to_yaml): the dataclasses alone need neither, so `python -m app.bench gpu` runs on a
# node that has only torch, numpy and h5py.


@dataclass(frozen=True)
class DataConfig:
    """Where the dataset lives and how it is fed.

    path: a dataset directory as written by data_prep (dataset.json, train/ and val/ shards).
    prefetch: batches read ahead of the step (0 = read synchronously).
    augment: random crop (4-pixel zero padding) and horizontal flip of training images; ignored
        for vector datasets and never applied to evaluation.
    """

    path: str = "data/demo"
    prefetch: int = 2
    augment: bool = True

    def __post_init__(self) -> None:
        _check_not_empty("data.path", self.path)
        _check_at_least("data.prefetch", self.prefetch, 0)


@dataclass(frozen=True)
class ModelConfig:
    """The backbone (data parallel, replicated on every rank) that maps inputs to features.

    backbone: `mlp` for vector datasets, `resnet` for image datasets (app/backbones.py).
    embedding_dim: D, the feature size and the row size of the classifier weight.
    mlp_hidden, mlp_layers: width and number of hidden Linear-BatchNorm-ReLU layers (0 = a single
        linear projection).
    resnet_blocks: basic blocks per stage; the stage count is its length.
    resnet_width: channels of the first stage, doubled by every following stage.
    classifier_init: the classifier rows at step 0: `random` (N(0, 1/D)), `centres` (each
        class's mean feature under the initial backbone, scaled to unit norm: "imprinted"
        weights, one pass over the train split; a class without samples keeps its random row),
        or `auto`: `centres` in knn mode with knn.init=centres (that pass is made anyway for the
        first graph, which then is a graph of the weights, so refreshes start from meaningful
        rows), else `random`. Measured: imprinting raised top-1 of both full and knn
        (docs/results/README.md); without it, a refresh early in a knn run builds its graph
        from rows most of which are still random. With `--init-from` it is not used: the
        known rows come from the checkpoint and the new ones follow `new_rows`.
    new_rows, keep_row_momentum: only for a run started with `--init-from` (app.train; other
        values are refused without it, unless --resume restores a run started so). new_rows:
        each NEW class's row (ids C_old.., not in the checkpoint) starts as `centres` (its mean
        feature under the loaded backbone, unit norm; one pass over the train split; a class
        without samples keeps its random row) or `random` (N(0, 1/D), as in a fresh run).
        keep_row_momentum: the known rows (ids 0..C_old-1) keep their classifier momentum from
        the checkpoint (true) or start with zero momentum (false); their weights are always
        copied bit for bit.
    """

    backbone: str = "mlp"
    embedding_dim: int = 128
    mlp_hidden: int = 512
    mlp_layers: int = 2
    resnet_blocks: list[int] = field(default_factory=lambda: [1, 1, 1])
    resnet_width: int = 16
    classifier_init: str = "auto"
    new_rows: str = "centres"
    keep_row_momentum: bool = False

    def __post_init__(self) -> None:
        _check_choice("model.backbone", self.backbone, ("mlp", "resnet"))
        _check_choice("model.new_rows", self.new_rows, ("centres", "random"))
        _check_choice("model.classifier_init", self.classifier_init,
                      ("auto", "random", "centres"))
        _check_at_least("model.embedding_dim", self.embedding_dim, 1)
        _check_at_least("model.mlp_hidden", self.mlp_hidden, 1)
        _check_at_least("model.mlp_layers", self.mlp_layers, 0)
        if not self.resnet_blocks or min(self.resnet_blocks) < 1:
            _fail("model.resnet_blocks", self.resnet_blocks, "a non-empty list of counts >= 1")
        _check_at_least("model.resnet_width", self.resnet_width, 1)


@dataclass(frozen=True)
class TrainConfig:
    """The training loop.

    steps: optimizer steps of the whole run (a resumed run continues up to the same number).
    batch_size: samples per RANK per step; the global batch is batch_size x world size.
    log_every: steps between metrics lines (the only steps that synchronise with the host).
    eval_every, checkpoint_every: steps between evaluations / checkpoints; 0 = only at the end.
    eval_batch_size: samples per rank per evaluation batch.
    eval_max_samples: cap on validation samples per evaluation; 0 = the whole val split.
    keep_checkpoints: the newest checkpoints kept on disk; older ones are deleted.
    crash_at_step: fault-injection hook for tests: raise at this step; -1 = off.
    dtype: parameter and compute dtype (float64 for exact comparisons in tests).
    on_nonfinite: what a step whose loss is NaN or infinite does. The loss is the global-batch
        mean, identical on every rank, so every rank decides at the same step, after the
        forward pass and before any weight changes. `stop`: every rank ends with one error line
        naming the step (exit 1), no checkpoint of that state. `skip`: the step changes
        nothing (no backbone or classifier update, momentum and batch-norm statistics as they
        were; its batch is consumed and the step counts), a record {"step", "epoch", "lr",
        "nonfinite_skipped": true, "consecutive_skipped"} goes to metrics.jsonl and a warning
        to the rank-0 log; the 10th skipped step in a row (MAX_CONSECUTIVE_SKIPS in
        app/training/trainer.py) stops the run as `stop` does.
    freeze_backbone_steps: the first N steps update only the classifier rows that are new (ids
        C_old.. of an `--init-from` run; every row otherwise): the backbone runs in eval mode
        without gradients (weights and batch-norm statistics unchanged) and the known rows keep
        weight and momentum; the step count, schedule and data order go on as usual. 0 = off.
    precision: `fp32`, or `bf16`: the backbone's forward pass (and so its backward) runs under
        torch.autocast with bfloat16 on the device its input is on (the CPU too: slower, but
        it works); its features are cast to float32 before the classifier, whose logits,
        softmax and loss are always float32 (app/training/precision.py). Needs dtype float32.
        Evaluation and the class centres stay float32.
    rows_dtype: the storage of the classifier rows: `fp32` only in this version (`bf16`, bf16
        rows with float32 master rows for the optimizer, is refused as not available).
    checkpoint_at_start: also write a checkpoint of the initial state (step 0: loaded and
        initialised rows, backbone) before the first step, e.g. to evaluate an `--init-from`
        start with app.evaluate.
    """

    steps: int = 1000
    batch_size: int = 256
    log_every: int = 20
    eval_every: int = 0
    eval_batch_size: int = 512
    eval_max_samples: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    crash_at_step: int = -1
    dtype: str = "float32"
    on_nonfinite: str = "stop"
    freeze_backbone_steps: int = 0
    checkpoint_at_start: bool = False
    precision: str = "fp32"
    rows_dtype: str = "fp32"

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "log_every", "eval_batch_size", "keep_checkpoints"):
            _check_at_least(f"train.{key}", getattr(self, key), 1)
        for key in ("eval_every", "eval_max_samples", "checkpoint_every", "freeze_backbone_steps"):
            _check_at_least(f"train.{key}", getattr(self, key), 0)
        _check_at_least("train.crash_at_step", self.crash_at_step, -1)
        _check_choice("train.dtype", self.dtype, ("float32", "float64"))
        _check_choice("train.on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        _check_choice("train.precision", self.precision, ("fp32", "bf16"))
        if self.precision == "bf16" and self.dtype != "float32":
            raise ValueError(f"train.precision: bf16 needs train.dtype=float32 (autocast leaves "
                             f"{self.dtype} tensors as they are), got train.dtype={self.dtype}")
        _check_choice("train.rows_dtype", self.rows_dtype, ("fp32", "bf16"))
        if self.rows_dtype == "bf16":
            raise ValueError("train.rows_dtype: bf16 (bf16 rows with float32 master rows) is not "
                             "available in this version; use fp32")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizers: `name` for the backbone, SGD with momentum for the classifier shard.

    lr is the learning rate for the GLOBAL batch as configured (batch_size x world size): there
    is no hidden scaling by world size, so changing the number of ranks changes the global batch
    and the lr must be changed explicitly.

    name, lr, momentum, weight_decay, betas: the backbone optimizer (`sgd` uses momentum,
        `adamw` uses betas; weight_decay is decoupled for adamw). `lars` (momentum,
        trust_coefficient) and `lamb` (betas, eps): large-batch optimizers for the BACKBONE only
        (app/training/optimizers.py), a trust ratio per weight tensor, none and no weight decay
        for biases and norm parameters. eps, trust_coefficient, and for lars/lamb momentum and
        betas, are refused away from their defaults when the optimizer does not read them.
    trust_coefficient: LARS's eta: the trust ratio is eta ||w|| / (||g|| + weight_decay ||w||).
    eps: the term added to the square root of the second moment (adamw, lamb).
    classifier_lr: lr of the classifier shard; None = the same as lr.
    classifier_momentum, classifier_weight_decay: the classifier shard's SGD, which updates only
        the weight rows a step touched.
    """

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    trust_coefficient: float = 0.001
    eps: float = 1e-8
    classifier_lr: float | None = None
    classifier_momentum: float = 0.9
    classifier_weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        _check_choice("optim.name", self.name, ("sgd", "adamw", "lars", "lamb"))
        if not self.lr > 0:
            _fail("optim.lr", self.lr, "> 0")
        _check_momentum("optim.momentum", self.momentum)
        _check_at_least("optim.weight_decay", self.weight_decay, 0.0)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            _fail("optim.betas", self.betas, "two numbers in [0, 1)")
        if not self.trust_coefficient > 0:
            _fail("optim.trust_coefficient", self.trust_coefficient, "> 0")
        if not self.eps > 0:
            _fail("optim.eps", self.eps, "> 0")
        self._refuse_unread_keys()
        if self.classifier_lr is not None and not self.classifier_lr > 0:
            _fail("optim.classifier_lr", self.classifier_lr, "> 0 or null")
        _check_momentum("optim.classifier_momentum", self.classifier_momentum)
        _check_at_least("optim.classifier_weight_decay", self.classifier_weight_decay, 0.0)

    def _refuse_unread_keys(self) -> None:
        reads = {"sgd": "momentum", "adamw": "betas eps", "lars": "momentum trust_coefficient",
                 "lamb": "betas eps"}[self.name].split()
        checked = {"momentum", "betas", "eps", "trust_coefficient"}
        for f in dataclasses.fields(self):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if f.name in checked - set(reads) and getattr(self, f.name) != default:
                raise ValueError(f"optim.{f.name}: {getattr(self, f.name)!r} is not read by "
                                 f"optim.name={self.name} (it reads {', '.join(reads)} and "
                                 f"weight_decay); remove the key")


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule, a function of the step (app/training/schedule.py) and, for
    `adaptive` decay, of the training loss (app/training/adaptive.py).

    warmup_steps: linear warm-up to the base lr over these first steps (0 = none).
    decay: after warm-up, `cosine` (to base lr x min_lr_ratio at train.steps), `step`
        (x gamma at each milestone), `constant`, or `adaptive` (the adaptive_* keys).
    min_lr_ratio: base lr x min_lr_ratio is where cosine ends and the adaptive floor (0 = none).
    milestones: absolute steps, strictly increasing, for `step` decay.
    adaptive_window, adaptive_threshold, adaptive_factor: the lr is multiplied by
        adaptive_factor whenever the mean loss of a window of adaptive_window steps is not below
        (1 - adaptive_threshold) x the best window mean so far; a metrics.jsonl record each.
    adaptive_stop: end the run (checkpoint, summary, exit 0) at the first flat window once the
        lr is at its floor (needs min_lr_ratio > 0); train.steps is then the most steps.
    The adaptive_* keys are refused with another decay unless left at their defaults.
    """

    warmup_steps: int = 0
    decay: str = "cosine"
    min_lr_ratio: float = 0.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    adaptive_factor: float = 0.5
    adaptive_threshold: float = 0.01
    adaptive_window: int = 100
    adaptive_stop: bool = False

    def __post_init__(self) -> None:
        _check_at_least("schedule.warmup_steps", self.warmup_steps, 0)
        _check_choice("schedule.decay", self.decay, ("cosine", "step", "constant", "adaptive"))
        _check_fraction("schedule.min_lr_ratio", self.min_lr_ratio, zero_ok=True)
        ms = self.milestones
        if any(m < 0 for m in ms) or any(a >= b for a, b in zip(ms, ms[1:])):
            _fail("schedule.milestones", ms, "strictly increasing steps >= 0")
        _check_fraction("schedule.gamma", self.gamma)
        if not 0.0 < self.adaptive_factor < 1.0:
            _fail("schedule.adaptive_factor", self.adaptive_factor, "in (0, 1)")
        if not 0.0 <= self.adaptive_threshold < 1.0:
            _fail("schedule.adaptive_threshold", self.adaptive_threshold, "in [0, 1)")
        _check_at_least("schedule.adaptive_window", self.adaptive_window, 1)
        if self.adaptive_stop and not self.min_lr_ratio > 0:
            raise ValueError("schedule.adaptive_stop: true needs schedule.min_lr_ratio > 0 "
                             "(the floor at which the run stops)")
        for f in dataclasses.fields(self):
            if self.decay != "adaptive" and f.name.startswith("adaptive_") and \
                    getattr(self, f.name) != f.default:
                raise ValueError(f"schedule.{f.name}: set, but it only acts with "
                                 f"schedule.decay=adaptive (decay is {self.decay!r})")


@dataclass(frozen=True)
class Config:
    """The whole run. seed drives every random stream; out_dir is the run directory."""

    seed: int = 0
    out_dir: str = "runs/demo"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    softmax: SoftmaxConfig = field(default_factory=SoftmaxConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        _check_at_least("seed", self.seed, 0)
        _check_not_empty("out_dir", self.out_dir)
        if self.comm.momentum_correction and self.optim.name != "sgd":
            raise ValueError(f"comm.momentum_correction: needs optim.name=sgd (it replaces the "
                             f"optimizer's momentum), got optim.name={self.optim.name!r}")
        if self.comm.overlap and self.comm.micro_batches > self.train.batch_size:
            raise ValueError(f"comm.micro_batches: {self.comm.micro_batches} micro-batches of a "
                             f"train.batch_size={self.train.batch_size} batch; set at most "
                             f"{self.train.batch_size}")


def load_config(path: str | None, overrides: list[str]) -> Config:
    """Defaults <- YAML file at `path` (None: none) <- `overrides` ("key=value", applied in order).

    Override values are parsed as YAML (`train.steps=100`, `model.resnet_blocks=[2,2,2]`,
    `optim.classifier_lr=null`). Raises ValueError (one line naming the key or file) for an
    unknown key, a value of the wrong type or outside its range, an unreadable or malformed file,
    or an override without '='.
    """
    import yaml  # noqa: PLC0415 - see the imports above
    from omegaconf import OmegaConf  # noqa: PLC0415
    from omegaconf.errors import OmegaConfBaseException  # noqa: PLC0415

    from app.config_yaml import assign, field_types, read_yaml, yaml_problem  # noqa: PLC0415

    conf = OmegaConf.structured(Config)
    # Frozen dataclasses make every node read-only; the merge writes into this private copy
    # and the frozen Config built at the end is what callers see.
    sections = [name for name, tp in field_types(Config).items() if dataclasses.is_dataclass(tp)]
    for node in [conf, *(conf[name] for name in sections)]:
        OmegaConf.set_readonly(node, None)
    if path is not None:
        for key, value in read_yaml(path).items():
            assign(Config, conf, str(key), value, path)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(
                f"--set {item!r}: cannot parse the value as YAML ({yaml_problem(e)})"
            ) from None
        assign(Config, conf, key.strip(), value, "--set")
    try:
        return OmegaConf.to_object(conf)
    except OmegaConfBaseException as e:  # interpolations are only resolved here
        first_line = str(e).split("\n")[0]
        raise ValueError(f"{getattr(e, 'full_key', '') or 'config'}: {first_line}") from None


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, in field order; `load_config` reads it back unchanged."""
    import yaml  # noqa: PLC0415

    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, default_flow_style=False)


def config_hash(cfg: Config) -> str:
    """16 hex digits of the sha256 of `config_to_yaml(cfg)`, for checkpoint manifests."""
    return hashlib.sha256(config_to_yaml(cfg).encode()).hexdigest()[:16]
