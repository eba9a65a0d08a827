"""Tests for ctscale.config: loading, overrides, saving and every error message."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from ctscale.config import (
    Config,
    DistributedConfig,
    MethodConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    validate,
)
from ctscale.errors import ConfigError, CtscaleError
from ctscale.storage.config_snapshot import save_config

YAML_RUN = """\
model:
  dtype: bfloat16
  trust_remote_code: true
data:
  task: mrpc
  max_train_samples: 100
train:
  lr: 2e-5
  weight_decay: 0
  batch_size: 32
  grad_accum: 4
  max_steps: 500
method:
  name: ct-d
  reserve_p: 0.1
fisher:
  candidates: [layer, attn]
  exclude: ['\\.bias$']
distributed:
  backend: deepspeed
  zero_stage: 2
"""

TOML_RUN = """\
[model]
dtype = "bfloat16"
trust_remote_code = true

[data]
task = "mrpc"
max_train_samples = 100

[train]
lr = 2e-5
weight_decay = 0
batch_size = 32
grad_accum = 4
max_steps = 500

[method]
name = "ct-d"
reserve_p = 0.1

[fisher]
candidates = ["layer", "attn"]
exclude = ['\\.bias$']

[distributed]
backend = "deepspeed"
zero_stage = 2
"""


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_round_trip_through_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "out" / "config.yaml"  # parent dir is created
    save_config(Config(), path)
    assert load_config(path) == Config() == load_config()
    assert os.listdir(path.parent) == ["config.yaml"]  # no temp file left behind


def test_non_default_round_trip_keeps_types(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, YAML_RUN))
    # strings that look like numbers must come back as strings
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, task="1e3", data_dir="007"))
    save_config(cfg, tmp_path / "saved.yml")
    assert load_config(tmp_path / "saved.yml") == cfg


def test_save_config_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.yaml"
    save_config(Config(), path)
    before = path.read_text()

    def boom(*_args: object) -> None:
        raise OSError("disk full")

    from ctscale.storage import atomic  # save_config writes through ctscale.storage.atomic

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError):
        save_config(load_config(overrides=["train.lr=0.5"]), path)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_yaml_and_toml_load_to_same_config(tmp_path: Path) -> None:
    from_yaml = load_config(write(tmp_path, YAML_RUN, "run.yaml"))
    from_toml = load_config(write(tmp_path, TOML_RUN, "run.toml"))
    assert from_yaml == from_toml != Config()
    assert from_yaml.train.lr == pytest.approx(2e-5)
    # ints given for float fields are converted, so types match the annotations
    assert isinstance(from_yaml.train.weight_decay, float)
    assert isinstance(from_toml.train.weight_decay, float)
    assert from_yaml.fisher.exclude == [r"\.bias$"]


@pytest.mark.parametrize("text", ["", "\n", "# settings to come\n"])
def test_empty_yaml_file_is_an_error_that_says_how_to_get_defaults(tmp_path: Path, text: str) -> None:
    """An empty file is more likely a mistake than a request for the ~1 h default run."""
    with pytest.raises(ConfigError, match=r"is empty .*omit --config \(or write '\{\}'"):
        load_config(write(tmp_path, text))
    assert load_config(write(tmp_path, "{}\n")) == Config()  # the explicit way
    assert load_config(None) == Config()


def test_duplicate_yaml_keys_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'lr' appears twice .*line 2 and line 3"):
        load_config(write(tmp_path, "train:\n  lr: 1.0e-3\n  lr: 5.0\n"))
    with pytest.raises(ConfigError, match=r"key 'train' appears twice .*line 1 and line 3"):
        load_config(write(tmp_path, "train:\n  lr: 1.0e-3\ntrain:\n  epochs: 1\n"))
    # a merge key's values may be overridden: that is what merge keys are for
    text = "data: &d\n  max_length: 64\ntrain:\n  <<: {epochs: 2, lr: 1.0e-3}\n  lr: 2.0e-5\n"
    cfg = load_config(write(tmp_path, text))
    assert (cfg.train.epochs, cfg.train.lr, cfg.data.max_length) == (2, 2e-5, 64)


@pytest.mark.parametrize(
    ("override", "section", "key", "expected"),
    [
        ("train.lr=2e-5", "train", "lr", 2e-5),
        ("train.lr=3", "train", "lr", 3.0),
        ("method.reserve_p=1.0", "method", "reserve_p", 1.0),
        ("train.epochs=7", "train", "epochs", 7),
        ("train.max_steps=null", "train", "max_steps", None),
        ("train.max_steps=250", "train", "max_steps", 250),
        ("fisher.candidates=[layer,attn]", "fisher", "candidates", ["layer", "attn"]),
        ("fisher.exclude=[]", "fisher", "exclude", []),
        ("train.bf16=true", "train", "bf16", True),
        ("train.save_model=false", "train", "save_model", False),
        ("data.data_dir=/data/glue", "data", "data_dir", "/data/glue"),
        ("method.name=ct-f", "method", "name", "ct-f"),
    ],
)
def test_override_of_each_type(override: str, section: str, key: str, expected: object) -> None:
    value = getattr(getattr(load_config(overrides=[override]), section), key)
    assert value == expected
    assert type(value) is type(expected)


def test_overrides_win_over_file_and_do_not_mutate_input(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, YAML_RUN), ["train.lr=0.001", "train.max_steps=null"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.batch_size) == (
        0.001,
        None,
        32,
    )
    raw = {"train": {"lr": 0.1}}
    assert apply_overrides(raw, ["train.epochs=2"]) == {"train": {"lr": 0.1, "epochs": 2}}
    assert raw == {"train": {"lr": 0.1}}


def test_config_to_dict_round_trips_through_config_from_dict() -> None:
    cfg = load_config(overrides=["method.name=ct-f", "fisher.candidates=[attn]"])
    data = config_to_dict(cfg)
    assert data["method"]["name"] == "ct-f"
    assert config_from_dict(data) == cfg


@pytest.mark.parametrize(
    "overrides",
    [
        ["method.reserve_p=1.0"],
        ["distributed.backend=deepspeed", "distributed.deepspeed_config=ds.json"],
        ["distributed.backend=deepspeed", "distributed.zero_stage=0"],
        ["train.batch_size=32", "train.grad_accum=8"],
        ["train.max_grad_norm=0", "train.warmup_ratio=0"],
    ],
)
def test_edge_values_are_valid(overrides: list[str]) -> None:
    load_config(overrides=overrides)


# (id, file text or None, file name, overrides, substrings the message must contain)
ERROR_CASES = [
    ("malformed-yaml", "train:\n  lr: [1, 2\nmodel: x\n", "run.yaml", [],
     ["invalid YAML", "run.yaml", "line 3", "fix the syntax"]),
    ("malformed-toml", "[train]\nlr = \n", "run.toml", [],
     ["invalid TOML", "run.toml", "line 2", "fix the syntax"]),
    ("unknown-section", "trian:\n  lr: 0.1\n", "run.yaml", [],
     ["unknown section 'trian'", "run.yaml", "valid sections: model, data", "did you mean 'train'"]),
    ("unknown-key", "train:\n  lrr: 0.1\n", "run.yaml", [],
     ["unknown key 'train.lrr'", "run.yaml", "valid keys in 'train'", "did you mean 'train.lr'"]),
    ("key-in-wrong-section", "train:\n  reserve_p: 0.5\n", "run.yaml", [],
     ["unknown key 'train.reserve_p'", "did you mean 'method.reserve_p'"]),
    ("wrong-type", "train:\n  batch_size: sixteen\n", "run.yaml", [],
     ["train.batch_size: expected an integer, got 'sixteen' (str) in", "run.yaml",
      "set it to an integer (default: 16)"]),
    ("bool-as-int", "model:\n  trust_remote_code: 1\n", "run.yaml", [],
     ["model.trust_remote_code: expected true or false, got 1 (int)", "set it to true or false"]),
    ("bool-as-string", '[train]\nbf16 = "true"\n', "run.toml", [],
     ["train.bf16: expected true or false, got 'true' (str)", "run.toml"]),
    ("list-not-string", "fisher:\n  candidates: layer\n", "run.yaml", [],
     ["fisher.candidates: expected a list of strings", "set it to a list of strings"]),
    ("section-not-mapping", "train: 3\n", "run.yaml", [],
     ["train: expected a section", "write 'train:'"]),
    ("top-level-list", "- a\n- b\n", "run.yaml", [],
     ["run.yaml", "expected a mapping of sections", "use sections model, data"]),
    ("reserve_p-0", None, "", ["method.reserve_p=0"],
     ["method.reserve_p must be in (0, 1]: got 0.0", "default: 0.3"]),
    ("reserve_p-negative", "method:\n  reserve_p: -0.1\n", "run.yaml", [],
     ["method.reserve_p must be in (0, 1]: got -0.1 in", "run.yaml", "set it to a value"]),
    ("reserve_p-1.5", None, "", ["method.reserve_p=1.5"],
     ["method.reserve_p must be in (0, 1]: got 1.5", "set it to a value that is in (0, 1]"]),
    ("unknown-method", "method:\n  name: ctf\n", "run.yaml", [],
     ["method.name: unknown value 'ctf'", "choose one of vanilla, ct-f, ct-d", "did you mean 'ct-f'"]),
    ("unknown-backend", "distributed:\n  backend: horovod\n", "run.yaml", [],
     ["distributed.backend: unknown value 'horovod'", "choose one of local, ddp, deepspeed, fsdp"]),
    ("unknown-dtype", None, "", ["model.dtype=fp16"],
     ["model.dtype: unknown value 'fp16'", "choose one of float32, bfloat16, float16"]),
    ("override-syntax", None, "", ["foo"],
     ["bad override --set 'foo'", "expected SECTION.KEY=VALUE", "--set train.lr=2e-5"]),
    ("override-no-key", None, "", ["train=3"], ["--set 'train=3'", "SECTION.KEY=VALUE"]),
    ("override-unknown-key", None, "", ["train.lrr=1e-5"],
     ["unknown key 'train.lrr'", "--set train.lrr=1e-5", "did you mean 'train.lr'"]),
    ("override-unknown-section", None, "", ["trian.lr=1e-5"],
     ["unknown section 'trian'", "did you mean 'train'"]),
    ("override-wrong-type", "train:\n  lr: 0.1\n", "run.yaml", ["train.epochs=three"],
     ["train.epochs: expected an integer, got 'three' (str) in --set train.epochs=three"]),
    ("override-bad-yaml", None, "", ["fisher.candidates=[a,"],
     ["fisher.candidates: value '[a,' is not valid YAML", "quote it"]),
    ("bad-regex", "fisher:\n  candidates: [layer, 'attn(']\n", "run.yaml", [],
     ["fisher.candidates[1]: invalid regular expression 'attn('", "escape special characters"]),
    ("bad-exclude-regex", None, "", ["fisher.exclude=['*bias']"],
     ["fisher.exclude[0]: invalid regular expression '*bias'"]),
    ("deepspeed-without-config", "distributed:\n  backend: deepspeed\n", "run.yaml", [],
     ["distributed.backend 'deepspeed'", "set distributed.deepspeed_config",
      "or distributed.zero_stage to 0..3"]),
    ("zero-stage-4", None, "", ["distributed.zero_stage=4"],
     ["distributed.zero_stage must be null or one of 0, 1, 2, 3: got 4"]),
    ("batch-not-divisible", None, "", ["train.grad_accum=3"],
     ["train.batch_size (16) must be divisible by train.grad_accum (3)",
      "set train.grad_accum to a divisor of 16"]),
    ("batch-size-0", None, "", ["train.batch_size=0"], ["train.batch_size must be >= 1: got 0"]),
    ("lr-0", None, "", ["train.lr=0"], ["train.lr must be > 0: got 0.0"]),
    ("lr-nan", None, "", ["train.lr=.nan"], ["train.lr: expected a number"]),
    ("weight-decay-negative", None, "", ["train.weight_decay=-1"],
     ["train.weight_decay must be >= 0"]),
    ("warmup-1", None, "", ["train.warmup_ratio=1"], ["train.warmup_ratio must be in [0, 1)"]),
    ("max-grad-norm-negative", None, "", ["fisher.max_grad_norm=-1"],
     ["fisher.max_grad_norm must be >= 0"]),
    ("max-steps-0", None, "", ["train.max_steps=0"],
     ["train.max_steps must be null or >= 1: got 0", "default: null"]),
    ("empty-task", None, "", ["data.task=''"], ["data.task must be non-empty"]),
    ("unsupported-suffix", "{}", "run.json", [], ["run.json", "use .yaml, .yml or .toml"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "name", "overrides", "expected"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_errors_name_key_and_fix(
    tmp_path: Path,
    text: str | None,
    name: str,
    overrides: list[str],
    expected: list[str],
) -> None:
    path = None if text is None else write(tmp_path, text, name)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert "\n" not in message  # one line, printed as-is by the CLI
    assert isinstance(info.value, CtscaleError)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_config_from_dict_is_strict_and_sourceless() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"train": {"lr": 0.1, "epochz": 2}})
    assert str(info.value).startswith("unknown key 'train.epochz'; valid keys")
    assert "did you mean 'train.epochs'" in str(info.value)
    with pytest.raises(ConfigError, match=r"config: expected a mapping of sections"):
        config_from_dict(["train"])  # type: ignore[arg-type]


def test_validate_direct() -> None:
    validate(Config())
    with pytest.raises(ConfigError, match=r"method\.reserve_p must be in \(0, 1\]: got 2\.0"):
        validate(Config(method=MethodConfig(reserve_p=2.0)))
    with pytest.raises(ConfigError, match=r"distributed\.deepspeed_config"):
        validate(Config(distributed=DistributedConfig(backend="deepspeed")))


def test_save_config_refuses_non_yaml_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"use a \.yaml or \.yml path"):
        save_config(Config(), tmp_path / "config.toml")
