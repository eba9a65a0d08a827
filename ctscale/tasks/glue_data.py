"""GLUE classification (and STS-B regression) as a :class:`~ctscale.tasks.base.TaskData`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctscale import batching, dist
from ctscale.config import Config, ModelConfig
from ctscale.models import load_classifier
from ctscale.tasks.base import Predict, subsample
from ctscale.tasks.glue import Examples, GlueTask, default_glue_dir, get_task, load_glue_split, tokenize
from ctscale.tasks.metrics import compute_metrics


@dataclass
class GlueData:
    """One GLUE task's train and eval splits, subsampled (seeded) when the config asks for it."""

    task: GlueTask
    train: Examples
    evals: dict[str, Examples]
    tokenizer: object
    max_length: int

    @classmethod
    def from_config(cls, cfg: Config, tokenizer) -> GlueData:
        task = get_task(cfg.data.task)
        data_dir = cfg.data.data_dir or default_glue_dir()
        seed = cfg.train.seed
        train = subsample(load_glue_split(task.name, "train", data_dir), cfg.data.max_train_samples, seed)
        evals = {
            split: subsample(load_glue_split(task.name, split, data_dir), cfg.data.max_eval_samples, seed)
            for split in task.eval_splits
        }
        return cls(task, train, evals, tokenizer, cfg.data.max_length)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return tuple(self.evals)

    @property
    def train_size(self) -> int:
        return len(self.train)

    def load_model(self, cfg: ModelConfig) -> torch.nn.Module:
        return load_classifier(cfg, self.task)

    def train_batch(self, indices: torch.Tensor, window: torch.Tensor, parts: int) -> dict:
        # one label per example and equal micro-batches: the mean loss needs no normaliser
        return tokenize(self.train.subset(indices.tolist()), self.tokenizer, self.max_length)

    def evaluate(
        self, split: str, predict: Predict, rank: int, world_size: int, batch_size: int
    ) -> dict[str, float]:
        examples = self.evals[split]
        idx, real = batching.eval_shard(len(examples), rank, world_size)
        preds = []
        for lo in range(0, idx.numel(), batch_size):
            batch = tokenize(
                examples.subset(idx[lo : lo + batch_size].tolist()), self.tokenizer, self.max_length
            )
            logits = predict(batch)
            preds.append(logits.squeeze(-1) if self.task.is_regression else logits.argmax(-1))
        local = torch.cat(preds)[:real].cpu().tolist() if preds else []
        gathered = [p for part in dist.all_gather_objects(local) for p in part]
        return compute_metrics(self.task, gathered, examples.labels)
