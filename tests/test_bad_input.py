"""A corpus of bad inputs: each gives one clear error (what, where, how to fix), a non-zero exit
status, no traceback, and leaves every file of a previous run in the same directory unchanged."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ctscale.cli import main

from conftest import write_tiny_bert
from dist_workers import tiny_overrides


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def previous_run(tiny_bert, glue_dir, tmp_path_factory) -> Path:
    """A finished CT-D run (config, mask, checkpoints, metrics, model) that bad runs aim at."""
    out = tmp_path_factory.mktemp("previous")
    overrides = tiny_overrides(tiny_bert, glue_dir, out) + ["method.name=ct-d", "train.save_model=true"]
    assert main(["train", *_sets(overrides)]) == 0
    return out


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _glue_copy(glue_dir: Path, root: Path) -> Path:
    copy = root / "glue"
    shutil.copytree(glue_dir / "RTE", copy / "RTE")
    return copy


# Each case: (id, builder(ctx) -> argv tail after the base overrides, words the message must contain)
def _file(ctx, name: str, text: str) -> Path:
    path = ctx["tmp"] / name
    path.write_text(text)
    return path


def _mask_variant(ctx, edit) -> Path:
    """A copy of the previous run's mask, edited by ``edit(tensors, header_meta)``."""
    src = ctx["run"] / "mask.safetensors"
    tensors = load_file(src)
    from safetensors import safe_open

    with safe_open(src, "pt") as fh:
        meta = dict(fh.metadata())
    edit(tensors, meta)
    dst = ctx["tmp"] / "edited.safetensors"
    save_file(tensors, dst, metadata=meta)
    return dst


def _future_version(tensors, meta):
    header = json.loads(meta["ctscale"])
    header["format_version"] = 99
    meta["ctscale"] = json.dumps(header)


def _foreign_names(tensors, meta):
    header = json.loads(meta["ctscale"])
    for piece in header["pieces"]:
        piece["name"] = piece["name"].replace("bert.", "roberta.")
        tensors[piece["key"].replace("bert.", "roberta.")] = tensors.pop(piece["key"])
        piece["key"] = piece["key"].replace("bert.", "roberta.")
    meta["ctscale"] = json.dumps(header)


def _other_model_mask(ctx) -> Path:
    """A real mask of a hidden-48 BERT: the same parameter names, other shapes."""
    other = write_tiny_bert(ctx["tmp"] / "other_model", hidden=48)
    mask = ctx["tmp"] / "other.safetensors"
    overrides = tiny_overrides(other, ctx["glue"], ctx["tmp"] / "other_run")
    assert main(["fisher", *_sets(overrides), "--out", str(mask)]) == 0
    return mask


def _nan_model(ctx) -> Path:
    path = ctx["tmp"] / "nan_model"
    shutil.copytree(ctx["model"], path)
    weights = load_file(path / "model.safetensors")
    weights["classifier.weight"] = torch.full_like(weights["classifier.weight"], float("nan"))
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _tsv_case(ctx, train_text: str | None = None, drop_dev: bool = False) -> list[str]:
    glue = _glue_copy(ctx["glue"], ctx["tmp"])
    if train_text is not None:
        (glue / "RTE" / "train.tsv").write_text(train_text)
    if drop_dev:
        (glue / "RTE" / "dev.tsv").unlink()
    return ["--set", f"data.data_dir={glue}"]


def _ds_json(ctx, content: dict) -> list[str]:
    path = _file(ctx, "ds.json", json.dumps(content))
    return ["--set", "distributed.backend=deepspeed", "--set", f"distributed.deepspeed_config={path}"]


CASES = [
    (
        "malformed-yaml",
        lambda c: ["--config", str(_file(c, "bad.yaml", "train:\n  lr: [1e-3\n"))],
        ["bad.yaml", "line"],
    ),
    ("malformed-toml", lambda c: ["--config", str(_file(c, "bad.toml", "[train\nlr = 1\n"))], ["bad.toml"]),
    ("missing-config", lambda c: ["--config", str(c["tmp"] / "nope.yaml")], ["nope.yaml"]),
    (
        "unknown-section",
        lambda c: ["--config", str(_file(c, "s.yaml", "trainer:\n  lr: 1.0e-3\n"))],
        ["trainer"],
    ),
    ("unknown-key", lambda c: ["--set", "train.lrr=1e-3"], ["train.lrr", "train.lr"]),
    ("wrong-type", lambda c: ["--set", "train.batch_size=sixteen"], ["train.batch_size", "integer"]),
    ("bool-as-int", lambda c: ["--set", "train.bf16=1"], ["train.bf16"]),
    ("p-zero", lambda c: ["--set", "method.reserve_p=0"], ["method.reserve_p", "(0, 1]"]),
    ("p-negative", lambda c: ["--set", "method.reserve_p=-0.2"], ["method.reserve_p"]),
    ("p-above-one", lambda c: ["--set", "method.reserve_p=1.5"], ["method.reserve_p"]),
    ("unknown-method", lambda c: ["--set", "method.name=ct-x"], ["method.name", "ct-d"]),
    ("unknown-backend", lambda c: ["--set", "distributed.backend=horovod"], ["distributed.backend", "fsdp"]),
    ("bad-override-syntax", lambda c: ["--set", "train.lr"], ["train.lr", "="]),
    ("bad-regex", lambda c: ["--set", "fisher.candidates=['layer(']"], ["fisher.candidates", "layer("]),
    ("batch-not-divisible", lambda c: ["--set", "train.batch_size=13"], ["batch_size", "13"]),
    ("profile-zero-steps", lambda c: ["--set", "train.profile_steps=0"], ["train.profile_steps", ">= 1"]),
    (
        "profile-past-last-step",
        lambda c: ["--set", "train.profile_from=3"],  # 2 steps from step 3 of a 4-step run
        ["train.profile_from=3", "4 steps"],
    ),
    (
        "ds-batch-contradiction",
        lambda c: _ds_json(c, {"train_batch_size": 32, "zero_optimization": {"stage": 2}}),
        ["train_batch_size", "32", "12"],
    ),
    (
        "ds-accum-contradiction",
        lambda c: _ds_json(c, {"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2}}),
        ["gradient_accumulation_steps", "4"],
    ),
    (
        "ds-missing-json",
        lambda c: [
            "--set",
            "distributed.backend=deepspeed",
            "--set",
            f"distributed.deepspeed_config={c['tmp']}/none.json",
        ],
        ["none.json"],
    ),
    ("mask-missing-file", lambda c: ["--mask", str(c["tmp"] / "absent.safetensors")], ["absent.safetensors"]),
    ("mask-future-version", lambda c: ["--mask", str(_mask_variant(c, _future_version))], ["format", "99"]),
    ("mask-other-model-names", lambda c: ["--mask", str(_mask_variant(c, _foreign_names))], ["roberta."]),
    (
        "mask-made-with-another-p",
        lambda c: ["--mask", str(c["run"] / "mask.safetensors"), "--set", "method.reserve_p=0.1"],
        ["method.reserve_p=0.3", "method.reserve_p=0.1", "allow_mask_mismatch"],
    ),
    (
        "mask-made-with-another-scope",
        lambda c: ["--mask", str(c["run"] / "mask.safetensors"), "--set", "fisher.candidates=[attention]"],
        ["fisher.candidates=['layer']", "['attention']"],
    ),
    (
        "mask-made-for-another-task",
        lambda c: ["--mask", str(c["run"] / "mask.safetensors"), "--set", "data.task=mrpc"],
        ["data.task='rte'", "'mrpc'"],
    ),
    ("mask-other-model-shapes", lambda c: ["--mask", str(_other_model_mask(c))], ["shape"]),
    ("mask-truncated", lambda c: ["--mask", str(_truncated(c))], ["truncated"]),
    ("mask-corrupted", lambda c: ["--mask", str(_corrupted(c))], ["checksum"]),
    ("missing-data-dir", lambda c: ["--set", f"data.data_dir={c['tmp']}/no_glue"], ["no_glue"]),
    ("missing-dev-split", lambda c: _tsv_case(c, drop_dev=True), ["dev.tsv"]),
    (
        "tsv-wrong-columns",
        lambda c: _tsv_case(c, "index\tfoo\tbar\tlabel\n0\ta\tb\tentailment\n"),
        ["sentence1"],
    ),
    (
        "empty-dataset",
        lambda c: _tsv_case(c, "index\tsentence1\tsentence2\tlabel\n"),
        ["train.tsv", "no data rows"],
    ),
    (
        "label-outside-set",
        lambda c: _tsv_case(c, "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n"),
        ["maybe"],
    ),
    ("unknown-task", lambda c: ["--set", "data.task=glue-x"], ["glue-x", "rte"]),
    ("train-smaller-than-batch", lambda c: ["--set", "data.max_train_samples=5"], ["batch"]),
    (
        "nan-in-fisher-pass",
        lambda c: [
            "--set",
            f"model.name_or_path={_nan_model(c)}",
            "--set",
            f"train.output_dir={c['tmp']}/nan_run",
        ],
        ["non-finite", "Fisher"],
    ),
    (
        "candidates-match-nothing",
        lambda c: ["--set", "method.name=ct-d", "--set", "fisher.candidates=[nothing_matches]"],
        ["fisher.candidates"],
    ),
    ("missing-model-dir", lambda c: ["--set", f"model.name_or_path={c['tmp']}/no_model"], ["no_model"]),
    (
        "other-run-in-output-dir",
        lambda c: ["--set", "data.task=mrpc", *KEEP],
        ["holds another run", "data.task", "train.overwrite=true"],
    ),
    (  # the case: another method and lr into a finished CT-D run
        "other-config-over-finished-run",
        lambda c: ["--set", "method.name=vanilla", "--set", "train.lr=5.0", *KEEP],
        ["holds another run", "method.name: 'ct-d' there, 'vanilla' now", "train.lr", "train.overwrite=true"],
    ),
    ("same-config-over-finished-run", lambda c: KEEP, ["holds a finished run", "train.overwrite=true"]),
    ("resume-and-overwrite", lambda c: ["--set", "train.resume=true"], ["train.resume", "train.overwrite"]),
    (
        "resume-with-another-p",  # the run's mask was made at 0.3: resuming must not relabel it 0.1
        lambda c: [
            "--set",
            "train.resume=true",
            "--set",
            "train.overwrite=false",
            "--set",
            "method.reserve_p=0.1",
        ],
        ["method.reserve_p: 0.3 there, 0.1 now"],
    ),
    (  # the model does not exist either: the output_dir error must come first (before any loading)
        "output-dir-is-a-file",
        lambda c: ["--set", f"train.output_dir={_file(c, 'run', '')}", *_no_model(c)],
        ["is a file", "train.output_dir"],
    ),
    (
        "output-dir-below-a-file",
        lambda c: ["--set", f"train.output_dir={_file(c, 'f', '')}/run", *_no_model(c)],
        ["is a file", "train.output_dir"],
    ),
    (
        "output-dir-not-writable",
        lambda c: ["--set", f"train.output_dir={_unwritable(c)}/run", *_no_model(c)],
        ["not writable", "train.output_dir"],
    ),
    (
        "duplicate-yaml-key",
        lambda c: ["--config", str(_file(c, "dup.yaml", "train:\n  lr: 1.0e-3\n  lr: 5.0\n"))],
        ["dup.yaml", "'lr' appears twice", "line 2", "line 3"],
    ),
    (
        "duplicate-yaml-section",
        lambda c: ["--config", str(_file(c, "dup.yaml", "train:\n  lr: 1.0e-3\ntrain:\n  epochs: 1\n"))],
        ["'train' appears twice"],
    ),
    (
        "empty-yaml-config",
        lambda c: ["--config", str(_file(c, "e.yaml", "# nothing yet\n"))],
        ["empty", "omit --config"],
    ),
    ("empty-toml-config", lambda c: ["--config", str(_file(c, "e.toml", ""))], ["empty", "omit --config"]),
]

# Commands other than `train` (whole argv; BASE is the corpus's base overrides, overwrite off).
COMMAND_CASES = [
    (
        "fisher-with-mask-file",
        lambda c: ["fisher", *c["base"], "--set", f"method.mask_file={c['run'] / 'mask.safetensors'}", *KEEP],
        ["method.mask_file", "ignored"],
    ),
    ("fisher-into-a-run-dir", lambda c: ["fisher", *c["base"], *KEEP], ["holds a run", "--out"]),
    (
        "fisher-out-not-writable",
        lambda c: ["fisher", *c["base"], "--out", f"{_unwritable(c)}/m.safetensors", *_no_model(c)],
        ["--out", "not writable"],
    ),
    ("mask-info-corrupted", lambda c: ["mask", "info", str(_corrupted(c))], ["checksum mismatch"]),
    ("mask-info-truncated", lambda c: ["mask", "info", str(_truncated(c))], ["truncated"]),
    (
        "mask-info-other-model",
        lambda c: ["mask", "info", str(c["run"] / "mask.safetensors"), "--model", str(_wide_model(c))],
        ["shape", "another model"],
    ),
]

KEEP = ["--set", "train.overwrite=false"]  # the corpus runs with overwrite on: these test it off


def _no_model(ctx) -> list[str]:
    return ["--set", f"model.name_or_path={ctx['tmp']}/no_model"]


def _wide_model(ctx) -> Path:
    return write_tiny_bert(ctx["tmp"] / "wide_model", hidden=48)


def _unwritable(ctx) -> Path:
    """A directory this process cannot write in: mode 0555, or (root ignores modes) a read-only
    tmpfs mount; skipped where neither is possible."""
    import os
    import subprocess

    path = ctx["tmp"] / "read_only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        ctx["finalize"](lambda: path.chmod(0o755))
        return path
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"root cannot mount a read-only tmpfs here: {mount.stderr.decode().strip()}")
    ctx["finalize"](lambda: subprocess.run(["umount", str(path)], check=True))
    return path


def _truncated(ctx) -> Path:
    data = (ctx["run"] / "mask.safetensors").read_bytes()
    path = ctx["tmp"] / "truncated.safetensors"
    path.write_bytes(data[: len(data) - 7])
    return path


def _corrupted(ctx) -> Path:
    data = bytearray((ctx["run"] / "mask.safetensors").read_bytes())
    data[-3] ^= 0xFF
    path = ctx["tmp"] / "corrupted.safetensors"
    path.write_bytes(bytes(data))
    return path


def test_corpus_has_at_least_25_cases():
    names = [c[0] for c in CASES + COMMAND_CASES]
    assert len(names) >= 25 and len(set(names)) == len(names)


def _base(previous_run: Path, tiny_bert: Path, glue_dir: Path) -> list[str]:
    """The previous run's own config, with train.overwrite on: a bad input must fail before a
    run that may replace that directory starts, and so change nothing there."""
    overrides = tiny_overrides(tiny_bert, glue_dir, previous_run)
    return _sets(overrides + ["method.name=ct-d", "train.save_model=true", "train.overwrite=true"])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_clearly_and_changes_nothing(
    case, previous_run, tiny_bert, glue_dir, tmp_path, capsys, request
):
    _, build, words = case
    ctx = {"tmp": tmp_path, "run": previous_run, "glue": glue_dir, "model": tiny_bert}
    ctx["finalize"] = request.addfinalizer
    before = _digest(previous_run)
    base = _base(previous_run, tiny_bert, glue_dir)
    tail = build(ctx)
    argv = ["train", *base, *tail] if tail[0] != "--config" else ["train", *tail, *base]
    _fails_clearly(argv, words, capsys)
    assert _digest(previous_run) == before, "a bad run changed a previous run's files"


@pytest.mark.parametrize("case", COMMAND_CASES, ids=[c[0] for c in COMMAND_CASES])
def test_bad_command_fails_clearly_and_changes_nothing(
    case, previous_run, tiny_bert, glue_dir, tmp_path, capsys, request
):
    _, build, words = case
    ctx = {"tmp": tmp_path, "run": previous_run, "glue": glue_dir, "model": tiny_bert}
    ctx |= {"finalize": request.addfinalizer, "base": _base(previous_run, tiny_bert, glue_dir)}
    before = _digest(previous_run)
    _fails_clearly(build(ctx), words, capsys)
    assert _digest(previous_run) == before, "a bad command changed a previous run's files"


def _fails_clearly(argv: list[str], words: list[str], capsys) -> None:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}; stderr: {err[-2000:]}"
    message = [line for line in err.splitlines() if line.startswith("ctscale: error:")]
    assert len(message) == 1 and "Traceback" not in err, err[-2000:]
    for word in words:
        assert word in message[0], f"{word!r} not in {message[0]!r}"


def test_a_bad_deepspeed_config_fails_before_any_engine_or_model(tmp_path):
    """Checked in a fresh interpreter: the error comes before deepspeed or transformers are
    imported, so before any process group, DeepSpeed op build or model load (about a second)."""
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    argv = ["train", "--set", "distributed.backend=deepspeed", "--set", f"distributed.deepspeed_config={bad}"]
    probe = (
        "import sys, torch.distributed as d; from ctscale.cli import main; "
        f"code = main({argv!r}); "
        "print(code, 'deepspeed' in sys.modules, 'transformers' in sys.modules, d.is_initialized())"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.split() == ["2", "False", "False", "False"], out.stdout + out.stderr[-2000:]
    assert "ZeRO stage 7 is not supported" in out.stderr


def test_a_lost_peer_is_one_line_and_other_runtime_errors_are_not_hidden(monkeypatch, capsys):
    import ctscale.cli as cli

    monkeypatch.setattr(cli.dist, "is_distributed", lambda: True)
    monkeypatch.setattr(cli.dist, "rank", lambda: 0)
    monkeypatch.setattr(cli.dist, "shutdown", lambda: None)
    gloo = "[pair.cc:537] Read error [10.0.0.2]:40630: Connection reset by peer. This is typically..."

    def fail(message):
        def command(args):
            raise RuntimeError(message)

        return command

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: argparse.Namespace(func=fail(gloo)))
    assert cli.main([]) == 3
    err = capsys.readouterr().err.strip()
    assert (
        err.count("\n") == 0
        and err.startswith("ctscale: error: rank 0 lost another rank")
        and "MAX_RESTARTS" in err
    )
    monkeypatch.setattr(parser, "parse_args", lambda argv: argparse.Namespace(func=fail("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main([])


def test_allow_mask_mismatch_trains_with_a_mask_made_with_another_p(
    previous_run, tiny_bert, glue_dir, tmp_path
):
    argv = [
        "train",
        *_base(previous_run, tiny_bert, glue_dir),
        "--mask",
        str(previous_run / "mask.safetensors"),
    ]
    argv += ["--set", "method.reserve_p=0.1", "--set", f"train.output_dir={tmp_path / 'run'}"]
    argv += ["--set", "train.allow_mask_mismatch=true"]
    assert main(argv) == 0
