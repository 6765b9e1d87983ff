"""app.config: defaults <- YAML <- --set, one-line ValueErrors naming the key, YAML round trip."""
import dataclasses
from pathlib import Path

import pytest

from app.config import (CommConfig, Config, KnnConfig, ModelConfig, OptimConfig, ScheduleConfig,
                        SoftmaxConfig, TrainConfig, config_hash, config_to_yaml, load_config)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# docs/design.md, "Contracts: Config keys": keys other parts rely on.
CONTRACT_KEYS = [
    "seed", "out_dir", "data.path", "model.backbone", "model.embedding_dim", "train.steps",
    "train.batch_size", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "softmax.mode", "softmax.k", "softmax.random_negatives", "softmax.sample_rate",
    "softmax.logit", "softmax.scale", "softmax.margin", "knn.refresh_every", "knn.index",
    "comm.gradients", "comm.sparse_ratio", "comm.overlap", "train.crash_at_step",
]


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_are_frozen_sections():
    cfg = load_config(None, [])
    assert cfg == Config()
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.schedule, ScheduleConfig)
    assert cfg.optim.classifier_lr is None and cfg.model.resnet_blocks == [1, 1, 1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 5


@pytest.mark.parametrize("key", CONTRACT_KEYS)
def test_contract_keys_exist(key):
    value = Config()
    for part in key.split("."):
        value = getattr(value, part)
    # Setting a key to its own default must be accepted and change nothing.
    text = str(value).lower() if isinstance(value, bool) else str(value)
    assert load_config(None, [f"{key}={text}"]) == Config()


def test_file_then_overrides_in_order(tmp_path):
    path = _write(tmp_path, "train:\n  steps: 50\n  batch_size: 8\nsoftmax: {mode: knn, k: 5}\n")
    cfg = load_config(path, ["train.steps=70", "softmax.k=7", "softmax.k=9"])
    assert (cfg.train.steps, cfg.train.batch_size) == (70, 8)
    assert (cfg.softmax.mode, cfg.softmax.k) == ("knn", 9)
    assert cfg.optim == OptimConfig()


def test_override_values_are_typed():
    cfg = load_config(None, [
        "optim.lr=1e-3", "model.resnet_blocks=[2, 3]", "optim.classifier_lr=0.5",
        "optim.name=adamw", "optim.betas=[0.8,0.99]", "schedule.milestones=[10,20]",
        "train.batch_size=32", "softmax.scale=16",
    ])
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.softmax.scale, float)
    assert cfg.model.resnet_blocks == [2, 3] and cfg.schedule.milestones == [10, 20]
    assert cfg.optim.classifier_lr == 0.5
    back_to_default = load_config(None, ["optim.classifier_lr=0.5", "optim.classifier_lr=null"])
    assert back_to_default.optim.classifier_lr is None


def test_section_mapping_and_interpolation(tmp_path):
    path = _write(tmp_path, "out_dir: runs/${softmax.mode}-${train.steps}\n")
    cfg = load_config(path, ["softmax={mode: sampled, sample_rate: 0.5}", "train.steps=9"])
    assert cfg.out_dir == "runs/sampled-9" and cfg.softmax.sample_rate == 0.5


def test_yaml_round_trip_and_hash(tmp_path):
    cfg = load_config(None, ["model.backbone=resnet", "optim.classifier_lr=0.01",
                             "train.dtype=float64", "schedule.milestones=[3]"])
    again = load_config(_write(tmp_path, config_to_yaml(cfg)), [])
    assert again == cfg
    assert config_hash(again) == config_hash(cfg) and len(config_hash(cfg)) == 16
    assert config_hash(load_config(None, ["seed=1"])) != config_hash(Config())


@pytest.mark.parametrize("name", ["demo.yaml", "template-cluster.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(str(CONFIGS / name), [])
    assert cfg.train.batch_size >= 1


def test_demo_config_is_the_documented_run():
    cfg = load_config(str(CONFIGS / "demo.yaml"), [])
    assert (cfg.data.path, cfg.out_dir) == ("data/demo", "runs/demo")
    assert (cfg.model.backbone, cfg.softmax.mode, cfg.softmax.logit) == ("mlp", "full", "cosine")
    assert (cfg.softmax.margin_type, cfg.schedule.decay) == ("cosface", "cosine")
    assert cfg.schedule.warmup_steps > 0 and cfg.train.checkpoint_every > 0


@pytest.mark.parametrize("overrides, message", [
    (["train.stepz=3"],
     "unknown config key 'train.stepz' (from --set); did you mean 'train.steps'?"),
    (["bogus=1"], "unknown config key 'bogus' (from --set)"),
    (["train.steps.x=1"], "unknown config key 'train.steps.x' (from --set)"),
    (["train.steps=abc"], "train.steps: expected int, got 'abc'"),
    (["train.steps=1.5"], "train.steps: expected int, got 1.5"),
    (["train.steps=null"], "train.steps: expected int, got None"),
    (["comm.overlap=1"], "comm.overlap: expected bool, got 1"),
    (["model.resnet_blocks=[1, x]"], "model.resnet_blocks: expected list of int, got [1, 'x']"),
    (["optim.classifier_lr=fast"], "optim.classifier_lr: expected float or null, got 'fast'"),
    (["train=5"], "train: expected a mapping of train.* keys, got 5"),
    (["softmax.mode=foo"], "softmax.mode: 'foo' not one of full|sampled|knn"),
    (["knn.index=lsh"], "knn.index: 'lsh' not one of flat|ivf|hnsw|torch|auto"),
    (["knn.refresh_mode=async"], "knn.refresh_mode: 'async' not one of sync|background"),
    (["knn.refresh_every=4", "knn.refresh_lag=5"],
     "knn.refresh_lag: 5 out of range, must be in [0, knn.refresh_every]"),
    (["knn.refresh_mode=background"],
     "knn.refresh_lag: 0 leaves a background build no steps to run beside"),
    (["train.dtype=float16"], "train.dtype: 'float16' not one of float32|float64"),
    (["train.precision=fp16"], "train.precision: 'fp16' not one of fp32|bf16"),
    (["train.precision=bf16", "train.dtype=float64"],
     "train.precision: bf16 needs train.dtype=float32"),
    (["train.rows_dtype=bf16"], "train.rows_dtype: bf16 (bf16 rows with float32 master rows) is "
                                "not available in this version"),
    (["train.batch_size=0"], "train.batch_size: 0 out of range, must be >= 1"),
    (["softmax.sample_rate=1.5"], "softmax.sample_rate: 1.5 out of range, must be in (0, 1]"),
    (["softmax.k=0"], "softmax.k: 0 out of range, must be >= 1"),
    (["optim.betas=[0.9]"], "optim.betas: [0.9] out of range, must be two numbers in [0, 1)"),
    (["schedule.milestones=[5, 5]"],
     "schedule.milestones: [5, 5] out of range, must be strictly increasing"),
    (["softmax.margin=0.5", "softmax.logit=dot"],
     "softmax.margin: 0.5 needs softmax.logit=cosine"),
    (["data.path="], "data.path: expected str, got None"),
    (["out_dir=''"], "out_dir: must not be empty"),
    (["seed=${nope}"], "seed: "),
    (["train.steps"], "--set 'train.steps': expected key=value"),
    (["=3"], "expected key=value"),
    (["x=[1"], "--set 'x=[1': cannot parse the value as YAML"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ValueError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text, message", [
    ("train:\n  stepz: 3\n", "unknown config key 'train.stepz' (from {path})"),
    ("- 1\n- 2\n", "config file '{path}': expected a mapping of config keys, got list"),
    ("train: [1\n", "config file '{path}': invalid YAML"),
    ("train:\n  batch_size: -4\n", "train.batch_size: -4 out of range"),
])
def test_bad_files_name_the_file_or_key(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError) as info:
        load_config(path, [])
    assert message.format(path=path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(ValueError, match="config file '.*nope.yaml': cannot read it"):
        load_config(str(tmp_path / "nope.yaml"), [])
    assert load_config(_write(tmp_path, ""), []) == Config()


def test_sections_validate_on_direct_construction():
    with pytest.raises(ValueError, match="softmax.mode"):
        SoftmaxConfig(mode="exact")
    with pytest.raises(ValueError, match="comm.sparse_ratio"):
        CommConfig(sparse_ratio=0.0)
    with pytest.raises(ValueError, match="knn.refresh_every"):
        KnnConfig(refresh_every=0)
    with pytest.raises(ValueError, match="train.crash_at_step"):
        TrainConfig(crash_at_step=-2)
