"""Logged models and the model registry: a checkpoint logged once as an MLflow model, its versions,
and the alias that marks the champion (with the score the quality gate compares)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import mlflow

from mydistill.tracking.client import client
from mydistill.tracking.runs import MODEL_TRAINING_VIEW, ui_base_url

SCORE_TAG = "mydistill.score"
SCORE_METRIC = "student_exact_match"
SCORE_METRIC_TAG = "mydistill.score_metric"  # which evaluate metric the score is (absent: exact, as before)
REGISTER_RUN_TAG = "mydistill.register_run_id"  # on a version: the run that registered it and holds the gate's inputs
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")

CHECKPOINT_TAG = "mydistill.checkpoint_sha256"  # a logged model's checkpoint (its manifest's inputs_sha256)


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
    name: str = "model", source_name: str | None = None,
) -> dict[str, str]:
    """Log a trained checkpoint folder as an MLflow model of the ``transformers`` flavor (task
    text-generation) under ``run_id``; returns its ``model_id`` and ``model_uri``.

    Loaded with ``mlflow.transformers.load_model`` it is a plain pipeline; through
    ``mlflow.pyfunc.load_model`` (and ``mlflow models serve``) a question goes in and the answer
    comes out: the saved prompt template applies the tokenizer's chat template and a step-by-step
    student's task prefix, greedy decoding, up to ``max_new_tokens`` new tokens, as evaluation does.
    The signature is given, not inferred, so logging runs no generation. ``name`` is what the run
    pages' "Logged models" list shows; ``source_name`` what its "Logged from" says (MLflow's default
    is the process's script: Prefect's engine.py under a worker).
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
                transformers_model=pipe, name=name, task="text-generation", signature=signature,
                input_example=example_prompt, prompt_template=template, pip_requirements=requirements,
                model_config={"max_new_tokens": max_new_tokens, "do_sample": False},
                metadata={"mydistill.prompt_prefix": prompt_prefix, "mydistill.prompt_template": template},
                tags={CHECKPOINT_TAG: fingerprint, **({"mlflow.source.name": source_name} if source_name else {})},
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
        try:
            c.create_registered_model(name, description="Students distilled by mydistill.")
        except mlflow.exceptions.MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":  # made by another run, or by our own re-sent request
                raise
    # the version's source run is the run that logged the model (its training stage), as the model's
    # own page says; the run that decided on it is named in the tags (the gate's decision is there too)
    version = c.create_model_version(
        name, source=model["model_uri"], run_id=model.get("run_id") or register_run_id,
        tags={**dict(tags or {}), **({REGISTER_RUN_TAG: register_run_id} if register_run_id else {})},
        model_id=model["model_id"],
    )
    return str(version.version)


def keep_first_version(name: str, tag: str, value: str) -> str:
    """The oldest version of ``name`` tagged ``tag = value``, any later ones deleted; returns its number.

    MLflow's client sends a request again when its answer was lost (POSTs too): a lost answer to
    "create version" makes a second version of the same checkpoint, which this removes.
    """
    c = client()
    safe = value.replace("'", "")
    versions = sorted(c.search_model_versions(f"name='{name}' and tags.`{tag}` = '{safe}'"), key=lambda v: int(v.version))
    for duplicate in versions[1:]:
        c.delete_model_version(name, duplicate.version)
    return str(versions[0].version)


def set_model_alias(name: str, alias: str, version: str) -> None:
    client().set_registered_model_alias(name, alias, version)


def alias_holder(name: str, alias: str) -> dict[str, Any] | None:
    """The version ``alias`` points to in registered model ``name`` and its recorded score.

    The score is the version's ``mydistill.score`` tag, else its run's ``student_exact_match``
    metric, else None. ``register_run_id`` is the run that registered it (where the gate's inputs
    are); the version's own ``run_id`` is the training stage that logged the model, and was the
    register run for a version made before the tag. No such model or alias: None. Any other error
    (e.g. the server is down) is raised: the gate must not take "could not ask" for "no champion".
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
    return {"version": str(version.version), "score": score, "run_id": version.run_id, "metric": metric,
            "register_run_id": version.tags.get(REGISTER_RUN_TAG) or version.run_id}


def set_model_version_tags(name: str, version: str, tags: Mapping[str, Any]) -> None:
    c = client()
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, str(value))


def model_version_url(name: str, version: str) -> str | None:
    base = ui_base_url()
    return f"{base}/#/models/{quote(name, safe='')}/versions/{version}?{MODEL_TRAINING_VIEW}" if base else None
