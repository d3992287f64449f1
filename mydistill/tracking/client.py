"""The connection to MLflow: the tracking URI, where new experiments keep their artifacts, the client.

Everything goes through ``MlflowClient`` with explicit run ids (no "active run" state), so stages
running in other threads or processes log into the right run.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from urllib.parse import quote

import mlflow
from mlflow import MlflowClient

# MLflow 3.17's own pandas calls (digests, log_table) use forms pandas 3 deprecates for pandas 4;
# nothing in our calls causes it, and the user can do nothing about it: silenced for mlflow's modules only.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"mlflow\.")
with contextlib.suppress(ImportError):
    from pandas.errors import Pandas4Warning

    warnings.filterwarnings("ignore", category=Pandas4Warning, module=r"mlflow\.")

from mydistill.config import REPO_ROOT


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else a project-local sqlite store in ``.mlflow/``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = REPO_ROOT / ".mlflow"
    root.mkdir(exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


_artifact_root: str | None = None  # tracking.artifact_location, set by configure()


def _default_artifact_location(experiment: str) -> str | None:
    """Where a new experiment's artifacts go: ``tracking.artifact_location`` when set; beside a sqlite
    store (MLflow's own default would be ``./mlruns`` of whatever directory the run started in);
    else None (a server or file store decides)."""
    if _artifact_root:
        return _artifact_root.rstrip("/") + "/" + quote(experiment)
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "artifacts" / experiment).as_uri()
    return None


def configure(tracking_uri: str | None = None, artifact_location: str | None = None) -> str:
    global _artifact_root
    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    _artifact_root = artifact_location
    if uri.startswith("sqlite:///"):
        _create_sqlite_store_once(uri)
    return uri


def _create_sqlite_store_once(uri: str) -> None:
    """Open a sqlite tracking store under a file lock: two runs started together on a fresh store
    would both run MLflow's schema migrations, and the second fail ('duplicate column name')."""
    from mydistill.locks import artifact_lock

    path = uri.removeprefix("sqlite:///")
    if not os.path.dirname(path) or not os.path.isdir(os.path.dirname(path)):
        return  # MLflow reports a missing folder in its own words
    with artifact_lock(path, what="MLflow store"):
        MlflowClient().search_experiments(max_results=1)


def current_uri() -> str:
    return mlflow.get_tracking_uri()


def client() -> MlflowClient:
    return MlflowClient()


def experiment_id(name: str) -> str:
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        # the MLflow UI opens "Model training" views (not GenAI ones) for experiments of this kind
        return c.create_experiment(
            name, artifact_location=_default_artifact_location(name),
            tags={"mlflow.experimentKind": "custom_model_development"},
        )
    except mlflow.exceptions.MlflowException:
        # created concurrently by another process
        return c.get_experiment_by_name(name).experiment_id
