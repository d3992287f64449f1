"""MLflow tracking: one parent run per pipeline run, one child run per stage.

Everything goes through ``MlflowClient`` with explicit run ids (no "active run" state), so stages
running in other threads or processes log into the right run. This is the only library module
that imports mlflow.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

from mydistill.config import REPO_ROOT

SECRET_MARKERS = ("key", "secret", "token", "password", "credential")
MASK = "***"
PARENT_TAG = "mlflow.parentRunId"


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else a project-local sqlite store in ``.mlflow/``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = REPO_ROOT / ".mlflow"
    root.mkdir(exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _default_artifact_location(experiment: str) -> str | None:
    """Local artifact folder beside the default sqlite store (None: let the server decide)."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and Path(uri.removeprefix("sqlite:///")).parent == REPO_ROOT / ".mlflow":
        return (REPO_ROOT / ".mlflow" / "artifacts" / experiment).as_uri()
    return None


def configure(tracking_uri: str | None = None) -> str:
    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def client() -> MlflowClient:
    return MlflowClient()


def experiment_id(name: str) -> str:
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=_default_artifact_location(name))
    except mlflow.exceptions.MlflowException:
        # created concurrently by another process
        return c.get_experiment_by_name(name).experiment_id


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def mask_secrets(params: Mapping[str, Any]) -> dict[str, Any]:
    """Replace values of secret-looking keys (``*key*``, ``*token*`` …) by ``***``.

    ``api_key_env`` names an environment variable, not a secret, and is kept.
    """
    out = {}
    for k, v in params.items():
        leaf = k.rsplit(".", 1)[-1].lower()
        secret = any(m in leaf for m in SECRET_MARKERS) and not leaf.endswith("_env") and v not in (None, "")
        out[k] = MASK if secret else v
    return out


def start_run(
    experiment: str, run_name: str, *, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
) -> str:
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = client().create_run(experiment_id(experiment), run_name=run_name, tags=all_tags)
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    flat = mask_secrets(flatten(params))
    items = [Param(k, str(v)[:6000]) for k, v in sorted(flat.items())]
    for start in range(0, len(items), 100):
        client().log_batch(run_id, params=items[start : start + 100])


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    now = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def metrics_logger(run_id: str):
    """A ``(metrics, step)`` callback for the training loop that logs into ``run_id``."""

    def log(metrics: Mapping[str, float], step: int) -> None:
        log_metrics(run_id, metrics, step)

    return log


def log_dataset(run_id: str, records: Sequence[Mapping[str, Any]], *, name: str, source: str, context: str) -> None:
    """Record a dataset as an ``mlflow.data`` input of the run (schema, digest, source URI)."""
    import pandas as pd

    dataset = mlflow.data.from_pandas(pd.DataFrame.from_records(list(records)), source=source, name=name)
    client().log_inputs(
        run_id,
        datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])],
    )


def log_table(run_id: str, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
    import pandas as pd

    client().log_table(run_id, data=pd.DataFrame.from_records(list(rows)), artifact_file=artifact_file)


def log_dict(run_id: str, data: Any, artifact_file: str) -> None:
    client().log_dict(run_id, data, artifact_file)


def log_figure(run_id: str, figure: Any, artifact_file: str) -> None:
    client().log_figure(run_id, figure, artifact_file)


def log_artifacts(run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
    client().log_artifacts(run_id, local_dir, artifact_path)


def log_history(run_id: str, history: Sequence[Mapping[str, float]]) -> None:
    """Log a training history (list of ``{"step": s, metric: value}``) as step metrics in one batch."""
    now = int(time.time() * 1000)
    metrics = [
        Metric(k, float(v), now, int(row["step"])) for row in history for k, v in row.items() if k != "step"
    ]
    for start in range(0, len(metrics), 1000):
        client().log_batch(run_id, metrics=metrics[start : start + 1000])


class stage_run:
    """Context manager: a child run for one stage under ``parent_run_id``; yields its id (or None).

    With no parent (a stage used alone without tracking) nothing is logged. The run ends FAILED
    if the stage raises, FINISHED otherwise.
    """

    def __init__(self, parent_run_id: str | None, stage: str, experiment: str, tags: Mapping[str, str] | None = None):
        self.parent_run_id, self.stage, self.experiment, self.tags = parent_run_id, stage, experiment, tags
        self.run_id: str | None = None

    def __enter__(self) -> str | None:
        if self.parent_run_id:
            self.run_id = start_run(
                self.experiment, self.stage, parent_run_id=self.parent_run_id,
                tags={"mydistill.stage": self.stage, **(self.tags or {})},
            )
        return self.run_id

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run_id:
            if exc is not None:
                set_tags(self.run_id, {"mydistill.error": f"{exc_type.__name__}: {exc}"[:5000]})
            end_run(self.run_id, "FAILED" if exc is not None else "FINISHED")


def register_model_version(run_id: str, artifact_path: str, name: str, tags: Mapping[str, str] | None = None) -> str:
    """A new version of registered model ``name`` from the run's artifact folder; returns its number."""
    c = client()
    try:
        c.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        c.create_registered_model(name, description="Students distilled by mydistill.")
    source = f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = c.create_model_version(name, source=source, run_id=run_id, tags=dict(tags or {}))
    return str(version.version)


def set_model_alias(name: str, alias: str, version: str) -> None:
    client().set_registered_model_alias(name, alias, version)
