"""Experiment trackers behind one tiny interface: ``train.report_to`` (rank 0 only).

    trackers = open_trackers(["tensorboard", "wandb"], run_dir, config_dict)
    for t in trackers: t.log({"train/loss": 0.69}, step=20)
    for t in trackers: t.close()

Why a module of its own: the trainer knows records, not libraries. Each tracker is one class
that imports its library lazily, so a run that does not ask for W&B or MLflow never imports
them, and a run that asks for one that is not installed fails in ``check_installed`` (called
before the model loads) with the ``pip install`` line that fixes it.

Where the files go, without a network:
- tensorboard: ``<run>/tensorboard`` (event files).
- wandb: ``<run>/wandb/offline-run-*`` in offline mode unless ``WANDB_MODE`` says otherwise
  (upload later with ``wandb sync <run>/wandb/offline-run-*``); project ``WANDB_PROJECT`` or
  ``ctscale``.
- mlflow: the local file store ``<run>/mlruns`` unless ``MLFLOW_TRACKING_URI`` is set
  (``MLFLOW_ALLOW_FILE_STORE=true`` is set for it: MLflow 3 otherwise refuses that store);
  experiment ``MLFLOW_EXPERIMENT_NAME`` or ``ctscale``. View: ``mlflow ui --backend-store-uri <run>/mlruns``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

from ctscale.errors import ConfigError

# tracker -> (module it imports, the extra that installs it)
_PACKAGES = {
    "tensorboard": ("tensorboard", None),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None:
        """Scalars (names like ``train/loss``, ``validation/accuracy``) at optimizer step ``step``."""
        ...

    def close(self) -> None: ...


def check_installed(names: list[str]) -> None:
    """ConfigError naming the ``pip install`` line for the first tracker whose library is missing.

    Cheap (no import): the trainer calls it before the model loads."""
    for name in names:
        module, extra = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            fix = f'pip install "ctscale[{extra}]"' if extra else f"pip install {module}"
            raise ConfigError(
                f"train.report_to lists {name!r} but the {module} package is not installed; "
                f"run `{fix}` or remove {name!r} from train.report_to"
            )


def open_trackers(names: list[str], run_dir: Path, config: dict[str, Any]) -> list[Tracker]:
    """One tracker per name, writing under ``run_dir``; ``config`` is logged as the run's parameters."""
    classes: dict[str, Callable[[Path, dict[str, Any]], Tracker]] = {
        "tensorboard": TensorBoardTracker,
        "wandb": WandbTracker,
        "mlflow": MlflowTracker,
    }
    return [classes[name](run_dir, config) for name in names]


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``metrics.jsonl`` record under tracker names: ``train/loss``;
    keys that already hold a ``/`` (eval splits: ``validation/accuracy``) stay as they are."""
    event = record["event"]
    return {
        key if "/" in key else f"{event}/{key}": float(value)
        for key, value in record.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and key not in ("time", "step")
    }


class TensorBoardTracker:
    """Event files under ``<run>/tensorboard``."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run in ``<run>/wandb``, offline unless ``WANDB_MODE`` is set."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "ctscale"),
            name=run_dir.name,
            dir=str(run_dir),
            mode=cast(Any, os.environ.get("WANDB_MODE", "offline")),  # wandb checks the value
            config=config,
            reinit="create_new",  # a second Trainer in one process gets its own run
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run in the local file store ``<run>/mlruns`` unless ``MLFLOW_TRACKING_URI`` is set."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = f"file:{(run_dir / 'mlruns').resolve()}"
            # MLflow 3 refuses the file store unless asked for: here it is asked for (no server
            # or database needed, the run's metrics stay in its directory)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "ctscale")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        for key, value in _flatten(config).items():
            self.client.log_param(self.run_id, key, value)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, value, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(config: dict[str, Any]) -> dict[str, str]:
    """``{"train": {"lr": 4e-5}}`` -> ``{"train.lr": "4e-05"}`` (MLflow params are flat strings)."""
    return {
        f"{section}.{key}": str(value)[:500]  # MLflow's limit on a param value
        for section, values in config.items()
        for key, value in values.items()
    }
