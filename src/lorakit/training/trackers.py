"""Experiment trackers (``--report-to tensorboard,wandb,mlflow``): the scalars of
``metrics.jsonl`` and the run's resolved settings, written where each tool reads them.

=============  ==============================================================  =============
tracker        where, offline                                                  extra
=============  ==============================================================  =============
tensorboard    ``OUTPUT/tensorboard`` (event files; the settings as text)      tensorboard
wandb          ``OUTPUT/wandb`` in W&B's offline mode (``wandb sync`` uploads)  wandb
mlflow         the local file store ``OUTPUT/mlruns`` (``mlflow ui``), or       mlflow
               ``$MLFLOW_TRACKING_URI`` where it is set
=============  ==============================================================  =============

Scalars are named ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s``,
``train/loss_<task>``, ``eval/loss`` and ``eval/perplexity``, logged at the optimizer step.
Each tracker's package is imported only when asked for; one that is not installed fails
before any model loads (:func:`check_trackers`), naming the extra that brings it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..errors import LoraError

# Tracker -> (the module it imports, the pip extra of lorakit that installs it).
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


class Tracker(Protocol):
    """What :class:`~lorakit.training.metrics.Metrics` asks of a tracker."""

    def log(self, scalars: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def tracker_problems(names: Sequence[str]) -> list[str]:
    """Unknown tracker names, as config problems."""
    return [
        f"report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}"
        for name in names
        if name not in TRACKERS
    ]


def check_trackers(names: Sequence[str]) -> None:
    """Refuse a tracker whose package is not installed (without importing it), in one line.

    Raises:
        LoraError: naming the tracker and the extra to install.
    """
    for name in names:
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise LoraError(
                f"--report-to {name} needs the {module} package: pip install 'lorakit[{extra}]'."
            )


def open_trackers(
    names: Sequence[str], output: Path, settings: Mapping[str, Any], start_step: int
) -> list[Tracker]:
    """The trackers ``names`` for a run writing to ``output``, each given ``settings``.

    ``start_step``: where a resumed run goes on (TensorBoard drops what it logged after it).
    """
    check_trackers(names)
    opened: list[Tracker] = []
    for name in dict.fromkeys(names):  # each once, in order
        opened.append(_OPENERS[name](output, dict(settings), start_step))
    return opened


class _TensorBoard:
    def __init__(self, output: Path, settings: dict[str, Any], start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run's events replace those an interrupted one wrote after it.
        purge = start_step + 1 if start_step else None
        self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=purge)
        if not start_step:
            self.writer.add_text("config", f"```\n{json.dumps(settings, indent=2)}\n```", 0)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, output: Path, settings: dict[str, Any], start_step: int) -> None:
        import wandb

        output.mkdir(parents=True, exist_ok=True)
        # Offline: no account, no network; `wandb sync OUTPUT/wandb/offline-run-*` uploads.
        self.run = wandb.init(
            mode="offline",
            dir=str(output),
            project=os.environ.get("WANDB_PROJECT", "lorakit"),
            name=output.name,
            config=settings,
            reinit="create_new",
        )

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, output: Path, settings: dict[str, Any], start_step: int) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        # A client, not mlflow's global active run: nothing of the caller's MLflow changes.
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (output / "mlruns").resolve().as_uri()
            # MLflow 3 keeps its file store working (in maintenance) behind this opt-in; a
            # database store would need a server's dependencies for one run's numbers.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name("lorakit")
        experiment = found.experiment_id if found else self.client.create_experiment("lorakit")
        self.run_id = self.client.create_run(experiment, run_name=output.name).info.run_id
        params = [Param(k, _param(v)) for k, v in settings.items()]
        self.client.log_batch(self.run_id, params=params)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _param(value: Any) -> str:
    """A setting as MLflow's parameter text (at most 6000 characters)."""
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return text[:6000]


_OPENERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}
