"""Runs: one parent run per pipeline run, one child run per stage; who owns a run, runs left behind by
a killed process, earlier pipeline runs, and the links people click."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow

from mydistill.tracking.client import client, display_uri, experiment_id  # noqa: F401 (display_uri imported from here too)
from mydistill.tracking.log import set_tags

PARENT_TAG = "mlflow.parentRunId"


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


def _experiment(name: str):
    """The experiment called ``name``, or None where there is none (or the store cannot say)."""
    try:
        return client().get_experiment_by_name(name)
    except mlflow.exceptions.MlflowException:
        return None


def mark_dead_runs_killed(experiment: str) -> list[str]:
    """End as KILLED the runs of ``experiment`` left RUNNING by a process of this machine that is gone
    (a kill -9, a lost worker); returns their ids. Runs of other machines are left alone: whether
    their owner lives cannot be seen from here."""
    exp = _experiment(experiment)
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


class stage_run:
    """Context manager: a child run for one stage under ``parent_run_id``; yields its id (or None).

    With no parent (a stage used alone without tracking) nothing is logged. The run ends FINISHED,
    FAILED if the stage raises an error, KILLED if it was stopped from outside (:func:`stopped_status`).
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
            status = "FINISHED" if exc is None else stopped_status(exc)
            if status == "KILLED":
                set_tags(self.run_id, {"mydistill.error": f"stopped from outside ({exc_type.__name__})"})
            elif exc is not None:
                set_tags(self.run_id, {"mydistill.error": f"{exc_type.__name__}: {exc}"[:5000]})
            end_run(self.run_id, status)


def stopped_status(exc: BaseException) -> str:
    """The MLflow status of a run that ``exc`` ended: FAILED for an error, KILLED when the process was
    stopped from outside (a cancelled flow run's SIGTERM, Ctrl-C, an exit): exceptions that are not
    ``Exception``s."""
    return "FAILED" if isinstance(exc, Exception) else "KILLED"


def kill_open_runs(experiment: str, tags: Mapping[str, str], why: str) -> list[str]:
    """End as KILLED the runs of ``experiment`` still RUNNING that carry every tag of ``tags``, and their
    child runs still RUNNING; returns their ids. For a run whose process was stopped before it could
    end its runs (a cancelled flow run killed after its grace period)."""
    exp = _experiment(experiment)
    if exp is None:
        return []
    match = " and ".join(f"tags.`{key}` = '{value.replace(chr(39), '')}'" for key, value in tags.items())
    parents = client().search_runs([exp.experiment_id], match, max_results=100)
    ended = []
    for parent in parents:
        children = client().search_runs(
            [exp.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and attributes.status = 'RUNNING'", max_results=1000,
        )
        for run in [*children, *([parent] if parent.info.status == "RUNNING" else [])]:
            set_tags(run.info.run_id, {"mydistill.error": why})
            end_run(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    return ended


def child_metrics(parent_run_id: str) -> list[dict[str, float]]:
    """The latest metrics of every child run of ``parent_run_id``."""
    parent = client().get_run(parent_run_id)
    children = client().search_runs(
        [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=1000,
    )
    return [dict(run.data.metrics) for run in children]


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


# ----------------------------------------------------------------------------------------------
# links people click

UI_URL_ENV = "MYDISTILL_MLFLOW_UI_URL"


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


# MLflow 3.17's UI shows every experiment in its GenAI view unless the page asks for the model
# training one (the `mlflow.experimentKind` tag no longer decides it): our links ask.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def run_reference(run_id: str) -> dict[str, Any]:
    """What a person needs to find run ``run_id``: its ids, and its UI address when there is a server."""
    experiment = client().get_run(run_id).info.experiment_id
    base = ui_base_url()
    return {
        "run_id": run_id,
        "experiment_id": experiment,
        "url": f"{base}/#/experiments/{experiment}/runs/{run_id}?{MODEL_TRAINING_VIEW}" if base else None,
        "tracking_uri": display_uri(mlflow.get_tracking_uri()),
    }
