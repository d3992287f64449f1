"""MLflow tracking: one parent run per pipeline run, one child run per stage.

Everything goes through ``MlflowClient`` with explicit run ids (no "active run" state), so stages
running in other threads or processes log into the right run. This is the only library module
that imports mlflow.
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import mlflow
from mlflow import MlflowClient

# MLflow 3.17's own pandas calls (digests, log_table) use forms pandas 3 deprecates for pandas 4;
# nothing in our calls causes it, and the user can do nothing about it: silenced for mlflow's modules only.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"mlflow\.")
with contextlib.suppress(ImportError):
    from pandas.errors import Pandas4Warning

    warnings.filterwarnings("ignore", category=Pandas4Warning, module=r"mlflow\.")
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

from mydistill.config import REPO_ROOT

SECRET_WORDS = frozenset({"key", "apikey", "secret", "token", "password", "passwd", "credential", "credentials"})
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
    return uri


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
    """Replace values of secret-looking keys by ``***``: a key whose last part has a word such as
    ``key``, ``secret``, ``token`` or ``password`` (``api_key``, ``hf_token``, ``secret_access_key``).

    Whole words only, so ``max_new_tokens`` and ``tokenizer_uri`` are kept; so is ``api_key_env``,
    which names an environment variable rather than holding a secret.
    """
    out = {}
    for k, v in params.items():
        leaf = k.rsplit(".", 1)[-1].lower()
        words = set(leaf.replace("-", "_").split("_"))
        secret = bool(words & SECRET_WORDS) and not leaf.endswith("_env") and v not in (None, "")
        out[k] = MASK if secret else v
    return out


def start_run(
    experiment: str, run_name: str, *, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
) -> str:
    all_tags = {**owner_tags(), **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = client().create_run(experiment_id(experiment), run_name=run_name, tags=all_tags)
    return run.info.run_id


# Which process owns a run: a run left RUNNING by a process that is gone was killed.
OWNER_HOST_TAG, OWNER_PID_TAG, OWNER_START_TAG = "mydistill.host", "mydistill.pid", "mydistill.pid_started"


def owner_tags() -> dict[str, str]:
    import psutil

    return {
        OWNER_HOST_TAG: socket.gethostname(), OWNER_PID_TAG: str(os.getpid()),
        OWNER_START_TAG: f"{psutil.Process().create_time():.3f}",
    }


def _owner_alive(tags: Mapping[str, str]) -> bool:
    import psutil

    try:
        process = psutil.Process(int(tags[OWNER_PID_TAG]))
        return f"{process.create_time():.3f}" == tags.get(OWNER_START_TAG)  # not a reused pid
    except (psutil.NoSuchProcess, ValueError, KeyError):
        return False


def mark_dead_runs_killed(experiment: str) -> list[str]:
    """End as KILLED the runs of ``experiment`` left RUNNING by a process of this machine that is gone
    (a kill -9, a lost worker); returns their ids. Runs of other machines are left alone: whether
    their owner lives cannot be seen from here."""
    try:
        exp = client().get_experiment_by_name(experiment)
    except mlflow.exceptions.MlflowException:
        return []
    if exp is None:
        return []
    host = socket.gethostname().replace("'", "")
    stale = client().search_runs(
        [exp.experiment_id], f"attributes.status = 'RUNNING' and tags.`{OWNER_HOST_TAG}` = '{host}'", max_results=1000,
    )
    killed = [run.info.run_id for run in stale if not _owner_alive(run.data.tags)]
    for run_id in killed:
        set_tags(run_id, {"mydistill.error": "its process ended without closing the run (killed)"})
        end_run(run_id, "KILLED")
    return killed


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


def child_metrics(parent_run_id: str) -> list[dict[str, float]]:
    """The latest metrics of every child run of ``parent_run_id``."""
    parent = client().get_run(parent_run_id)
    children = client().search_runs(
        [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=1000,
    )
    return [dict(run.data.metrics) for run in children]


def metrics_logger(run_id: str):
    """A ``(metrics, step)`` callback for the training loop that logs into ``run_id``."""

    def log(metrics: Mapping[str, float], step: int) -> None:
        log_metrics(run_id, metrics, step)

    return log


def log_dataset(run_id: str, records: Sequence[Mapping[str, Any]], *, name: str, source: str, context: str) -> None:
    """Record a dataset as an ``mlflow.data`` input of the run (schema, digest, source URI)."""
    import pandas as pd

    frame = pd.DataFrame.from_records(list(records))
    # counts (token counts, sample indices) as float64: MLflow's schema inference warns that an integer
    # column cannot hold a missing value, and recommends exactly this for a logged schema
    frame = frame.astype({c: "float64" for c in frame.columns if pd.api.types.is_integer_dtype(frame[c])})
    dataset = mlflow.data.from_pandas(frame, source=_dataset_source(source), name=name)
    client().log_inputs(
        run_id,
        datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])],
    )


def _dataset_source(uri: str) -> Any:
    """The one dataset source class that resolves ``uri``, chosen here: MLflow registers its local
    artifact source twice and warns that a local path "can be interpreted in multiple ways"."""
    from mlflow.data.dataset_source_registry import get_registered_sources

    for source in get_registered_sources():
        if source._can_resolve(uri):
            return source._resolve(uri)
    return uri


def log_table(run_id: str, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
    import pandas as pd

    client().log_table(run_id, data=pd.DataFrame.from_records(list(rows)), artifact_file=artifact_file)


def log_dict(run_id: str, data: Any, artifact_file: str) -> None:
    client().log_dict(run_id, data, artifact_file)


def log_figure(run_id: str, figure: Any, artifact_file: str) -> None:
    client().log_figure(run_id, figure, artifact_file)


def log_artifacts(run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
    client().log_artifacts(run_id, local_dir, artifact_path)


def log_artifact(run_id: str, local_path: str, artifact_path: str | None = None) -> None:
    client().log_artifact(run_id, local_path, artifact_path)


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


def find_model_version(name: str, tag: str, value: str) -> dict[str, Any] | None:
    """The newest version of registered model ``name`` whose tag ``tag`` is ``value`` (None: none)."""
    safe = value.replace("'", "")
    try:
        versions = client().search_model_versions(f"name='{name}' and tags.`{tag}` = '{safe}'")
    except mlflow.exceptions.MlflowException as e:
        if e.error_code in _NOT_FOUND:
            return None
        raise
    if not versions:
        return None
    newest = max(versions, key=lambda v: int(v.version))
    return {"version": str(newest.version), "tags": dict(newest.tags), "run_id": newest.run_id}


CHECKPOINT_TAG = "mydistill.checkpoint_sha256"  # a logged model's checkpoint (its manifest's inputs_sha256)


def find_logged_model(experiment: str, fingerprint: str) -> dict[str, str] | None:
    """The MLflow logged model made from the checkpoint with this fingerprint (None: not logged yet)."""
    exp = client().get_experiment_by_name(experiment)
    if exp is None:
        return None
    safe = fingerprint.replace("'", "")
    found = client().search_logged_models(
        experiment_ids=[exp.experiment_id], filter_string=f"tags.`{CHECKPOINT_TAG}` = '{safe}'", max_results=1,
    )
    model = next(iter(found), None)
    return {"model_id": model.model_id, "model_uri": f"models:/{model.model_id}", "run_id": model.source_run_id} if model else None


def log_checkpoint_model(
    run_id: str, checkpoint_dir: str, *, fingerprint: str, example_prompt: str, max_new_tokens: int, prompt_prefix: str = "",
) -> dict[str, str]:
    """Log a trained checkpoint folder as an MLflow model of the ``transformers`` flavor (task
    text-generation) under ``run_id``; returns its ``model_id`` and ``model_uri``.

    Loaded with ``mlflow.transformers.load_model`` it is a plain pipeline; through
    ``mlflow.pyfunc.load_model`` (and ``mlflow models serve``) a question goes in and the answer
    comes out: the saved prompt template applies the tokenizer's chat template and a step-by-step
    student's task prefix, greedy decoding, up to ``max_new_tokens`` new tokens, as evaluation does.
    The signature is given, not inferred, so logging runs no generation.
    """
    import logging

    import transformers
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    from mydistill.tokenization import format_prompt

    pipe = transformers.pipeline("text-generation", model=checkpoint_dir, tokenizer=checkpoint_dir)
    template = format_prompt(pipe.tokenizer, prompt_prefix + "{prompt}")
    signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]))
    requirements = [f"transformers=={transformers.__version__}", f"torch=={_version('torch')}", "tokenizers", "safetensors"]
    # a local checkpoint has no hub model card or license for MLflow to fetch; it says so at WARNING on every log
    flavor_log = logging.getLogger("mlflow.transformers")
    level = flavor_log.level
    flavor_log.setLevel(logging.ERROR)
    try:
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.transformers.log_model(
                transformers_model=pipe, name="model", task="text-generation", signature=signature,
                input_example=example_prompt, prompt_template=template, pip_requirements=requirements,
                model_config={"max_new_tokens": max_new_tokens, "do_sample": False},
                metadata={"mydistill.prompt_prefix": prompt_prefix, "mydistill.prompt_template": template},
                tags={CHECKPOINT_TAG: fingerprint},
            )
    finally:
        flavor_log.setLevel(level)
    return {"model_id": info.model_id, "model_uri": info.model_uri, "run_id": run_id}


def link_model(run_id: str, model_id: str, *, as_output: bool) -> None:
    """Show a logged model on another run's page: as its output (the pipeline run's student) or input."""
    from mlflow.entities import LoggedModelInput, LoggedModelOutput

    if as_output:
        client().log_outputs(run_id, [LoggedModelOutput(model_id=model_id, step=0)])
    else:
        client().log_inputs(run_id, models=[LoggedModelInput(model_id=model_id)])


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package).split("+")[0]


def register_model_version(
    name: str, model: Mapping[str, str], tags: Mapping[str, str] | None = None, *, register_run_id: str | None = None,
) -> str:
    """A new version of registered model ``name`` that is the logged ``model`` (from
    :func:`log_checkpoint_model`); returns its number."""
    c = client()
    try:
        c.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        c.create_registered_model(name, description="Students distilled by mydistill.")
    # the version's run is the one that decided on it (the gate's tags); the logged model keeps its training run
    version = c.create_model_version(
        name, source=model["model_uri"], run_id=register_run_id or model.get("run_id"), tags=dict(tags or {}),
        model_id=model["model_id"],
    )
    return str(version.version)


def set_model_alias(name: str, alias: str, version: str) -> None:
    client().set_registered_model_alias(name, alias, version)


# ----------------------------------------------------------------------------------------------
# the registry's quality gate, and links people click

SCORE_TAG = "mydistill.score"
SCORE_METRIC = "student_exact_match"
SCORE_METRIC_TAG = "mydistill.score_metric"  # which evaluate metric the score is (absent: exact, as before)
UI_URL_ENV = "MYDISTILL_MLFLOW_UI_URL"
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def alias_holder(name: str, alias: str) -> dict[str, Any] | None:
    """The version ``alias`` points to in registered model ``name`` and its recorded score.

    The score is the version's ``mydistill.score`` tag, else its run's ``student_exact_match``
    metric, else None. No such model or alias: None. Any other error (e.g. the server is down)
    is raised: the gate must not take "could not ask" for "no champion".
    """
    c = client()
    try:
        version = c.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code in _NOT_FOUND:
            return None
        raise
    score: float | None = None
    if SCORE_TAG in version.tags:
        score = float(version.tags[SCORE_TAG])
    elif version.run_id:
        score = c.get_run(version.run_id).data.metrics.get(SCORE_METRIC)
    metric = version.tags.get(SCORE_METRIC_TAG, "exact")
    return {"version": str(version.version), "score": score, "run_id": version.run_id, "metric": metric}


def set_model_version_tags(name: str, version: str, tags: Mapping[str, Any]) -> None:
    c = client()
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, str(value))


def display_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***`` (tracking URIs may carry basic-auth credentials)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:{MASK}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def ui_base_url() -> str | None:
    """Where people open the MLflow UI: ``$MYDISTILL_MLFLOW_UI_URL``, else the tracking server.

    None for a local store (sqlite, a folder): there is no server to link to.
    """
    override = os.environ.get(UI_URL_ENV)
    if override:
        return override.rstrip("/")
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)
        netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc)).rstrip("/")
    return None


def run_reference(run_id: str) -> dict[str, Any]:
    """What a person needs to find run ``run_id``: its ids, and its UI address when there is a server."""
    experiment = client().get_run(run_id).info.experiment_id
    base = ui_base_url()
    return {
        "run_id": run_id,
        "experiment_id": experiment,
        "url": f"{base}/#/experiments/{experiment}/runs/{run_id}" if base else None,
        "tracking_uri": display_uri(mlflow.get_tracking_uri()),
    }


def model_version_url(name: str, version: str) -> str | None:
    base = ui_base_url()
    return f"{base}/#/models/{quote(name, safe='')}/versions/{version}" if base else None


def pipeline_runs(experiment: str, run_name: str, max_results: int = 200) -> list[dict[str, Any]]:
    """Earlier pipeline (parent) runs named ``run_name``, oldest first: id, start time, metrics, tags."""
    runs = client().search_runs(
        [experiment_id(experiment)],
        filter_string=f"tags.`mydistill.pipeline` = 'true' and tags.`mlflow.runName` = '{run_name}'",
        order_by=["attributes.start_time DESC"], max_results=max_results,
    )
    return [
        {"run_id": r.info.run_id, "start_time": r.info.start_time, "status": r.info.status,
         "metrics": dict(r.data.metrics), "tags": dict(r.data.tags)}
        for r in reversed(runs)
    ]
