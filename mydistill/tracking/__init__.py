"""MLflow tracking: one parent run per pipeline run, one child run per stage.

Everything goes through ``MlflowClient`` with explicit run ids (no "active run" state), so stages
running in other threads or processes log into the right run. This is the only library package
that imports mlflow.

* :mod:`.client` -- the tracking URI, artifact locations, the client, experiments.
* :mod:`.log` -- what is logged into a run (params with secrets masked, metrics, datasets, ...).
* :mod:`.runs` -- starting and ending runs, runs a killed process left, links to runs.
* :mod:`.models` -- logged models, the model registry, the champion's alias and score.
"""

from mydistill.tracking.client import client, configure, current_uri, default_tracking_uri, experiment_id
from mydistill.tracking.log import (
    MASK,
    SECRET_WORDS,
    flatten,
    log_artifact,
    log_artifacts,
    log_dataset,
    log_dict,
    log_figure,
    log_history,
    log_metrics,
    log_params,
    log_table,
    mask_secrets,
    metrics_logger,
    set_tags,
)
from mydistill.tracking.models import (
    CHECKPOINT_TAG,
    SCORE_METRIC,
    SCORE_METRIC_TAG,
    SCORE_TAG,
    alias_holder,
    find_logged_model,
    find_model_version,
    link_model,
    log_checkpoint_model,
    model_version_url,
    register_model_version,
    set_model_alias,
    set_model_version_tags,
)
from mydistill.tracking.runs import (
    OWNER_HOST_TAG,
    OWNER_PID_TAG,
    OWNER_START_TAG,
    PARENT_TAG,
    UI_URL_ENV,
    child_metrics,
    display_uri,
    end_run,
    mark_dead_runs_killed,
    owner_tags,
    pipeline_runs,
    run_reference,
    stage_run,
    start_run,
    ui_base_url,
)

__all__ = [
    "CHECKPOINT_TAG",
    "MASK",
    "OWNER_HOST_TAG",
    "OWNER_PID_TAG",
    "OWNER_START_TAG",
    "PARENT_TAG",
    "SCORE_METRIC",
    "SCORE_METRIC_TAG",
    "SCORE_TAG",
    "SECRET_WORDS",
    "UI_URL_ENV",
    "alias_holder",
    "child_metrics",
    "client",
    "configure",
    "current_uri",
    "default_tracking_uri",
    "display_uri",
    "end_run",
    "experiment_id",
    "find_logged_model",
    "find_model_version",
    "flatten",
    "link_model",
    "log_artifact",
    "log_artifacts",
    "log_checkpoint_model",
    "log_dataset",
    "log_dict",
    "log_figure",
    "log_history",
    "log_metrics",
    "log_params",
    "log_table",
    "mark_dead_runs_killed",
    "mask_secrets",
    "metrics_logger",
    "model_version_url",
    "owner_tags",
    "pipeline_runs",
    "register_model_version",
    "run_reference",
    "set_model_alias",
    "set_model_version_tags",
    "set_tags",
    "stage_run",
    "start_run",
    "ui_base_url",
]
