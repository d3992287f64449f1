"""The connection to MLflow: the tracking URI, where new experiments keep their artifacts, the client.

Everything goes through ``MlflowClient`` with explicit run ids (no "active run" state), so stages
running in other threads or processes log into the right run.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

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
    # MLflow's own "🏃 View run … at: <url>" lines open the run in its GenAI view (MLflow 3.17 picks
    # the view from the address, see MODEL_TRAINING_VIEW); our log lines give the model training link
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    _artifact_root = artifact_location
    if uri.startswith("sqlite:///"):
        _create_sqlite_store_once(uri)
    return uri


def _create_sqlite_store_once(uri: str) -> None:
    """Open a sqlite tracking store under a file lock: two runs started together on a fresh store
    would both run MLflow's schema migrations, and the second fail ('duplicate column name')."""
    from mydistill.storage.locks import artifact_lock

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
        # MLflow 3.x UIs before 3.17's workflow switch chose the "Model training" view from this tag;
        # 3.17 reads the address (?workflowType=machine_learning) or the browser's last choice instead
        return c.create_experiment(
            name, artifact_location=_default_artifact_location(name),
            tags={"mlflow.experimentKind": "custom_model_development"},
        )
    except mlflow.exceptions.MlflowException:
        # created concurrently by another process
        return c.get_experiment_by_name(name).experiment_id


MASK = "***"  # what a secret reads as in params, tags and URIs


def display_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***`` (tracking URIs may carry basic-auth credentials)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:{MASK}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server kept failing (5xx, refused or reset connections, timeouts) after
    the retries of MLflow's client."""


_API_FAILED = re.compile(r"API request to (?:endpoint )?(\S+) failed with (?:error code (\d+)|exception (\w+))")


def tracking_unavailable(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is MLflow's client giving up on an unanswering server."""
    seen: BaseException | None = error
    while seen is not None:
        match = _API_FAILED.search(str(seen))
        if match and (match.group(3) or (match.group(2) or "").startswith("5")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def unavailable_error(error: BaseException) -> TrackingUnavailable:
    """``error`` (see :func:`tracking_unavailable`) told in one line naming the tracking server."""
    seen: BaseException | None = error
    what = ""
    while seen is not None and not what:
        match = _API_FAILED.search(str(seen))
        if match:
            # urllib3 gives up on a status it retried as "too many 503 error responses"
            status = match.group(2) or (m.group(1) if (m := re.search(r"too many (\d{3}) error responses", str(seen))) else None)
            what = f"HTTP {status} from {match.group(1)}" if status else f"{match.group(3)} on {match.group(1)}"
        seen = seen.__cause__ or seen.__context__
    return TrackingUnavailable(
        f"MLflow at {display_uri(current_uri())} kept failing after its client's retries ({what}); the stages finished "
        "so far are kept: run again once it answers (training resumes from its last checkpoint; a student is registered once)"
    )
