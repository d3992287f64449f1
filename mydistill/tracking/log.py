"""What is logged into a run: params (flattened, secrets masked), metrics, tags, datasets, tables,
figures, artifacts, training histories."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import mlflow
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

from mydistill.tracking.client import MASK, client

SECRET_WORDS = frozenset({"key", "apikey", "secret", "token", "password", "passwd", "credential", "credentials"})


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


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    """The leaves of ``params`` as ``a.b.c`` params, secrets masked; unset (None) leaves left out:
    they say nothing in the params table (the whole config is the run's ``config.json``)."""
    flat = mask_secrets({k: v for k, v in flatten(params).items() if v is not None})
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

    frame = pd.DataFrame.from_records(list(records))
    # counts (token counts, sample indices) as float64: MLflow's schema inference warns that an integer
    # column cannot hold a missing value, and recommends exactly this for a logged schema
    frame = frame.astype({c: "float64" for c in frame.columns if pd.api.types.is_integer_dtype(frame[c])})
    dataset = mlflow.data.from_pandas(frame, source=_dataset_source(source), name=name)
    client().log_inputs(
        run_id,
        datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])],
    )


def log_dataset_reference(run_id: str, *, name: str, source: str, digest: str, context: str) -> None:
    """Record a dataset as an input of the run by its source URI and fingerprint alone (nothing read:
    for a run that lists what it started from, e.g. the pipeline's prompts, real and eval data)."""
    from mlflow.data.meta_dataset import MetaDataset

    dataset = MetaDataset(_dataset_source(source), name=name, digest=digest[:36])
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


def read_dict(run_id: str, artifact_file: str) -> Any | None:
    """A JSON artifact :func:`log_dict` wrote into a run; None when the run has no such file (a run
    from before it was logged). Any other error is raised."""
    import json
    import os
    import tempfile

    directory = os.path.dirname(artifact_file)
    listed = {a.path for a in client().list_artifacts(run_id, directory or None)}
    if artifact_file not in listed:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        with open(client().download_artifacts(run_id, artifact_file, tmp)) as f:
            return json.load(f)


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
