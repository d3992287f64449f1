"""One Prefect task per pipeline stage, each calling one function of :mod:`mydistill.stage_functions`.

Retries only where I/O can fail (the teacher API, object stores, the MLflow server), never on
training, which would just fail again. Stages whose outputs are addressed by the plan use
:data:`ARTIFACT_CACHE`: the output URI (the stage's identity: its settings and the fingerprints of
what it reads, see :mod:`mydistill.pipeline.plan`) and the task's code, and not the whole config and plan,
so a changed input re-runs exactly the stages downstream of it. :func:`fresh_unless_done` makes a
stage run again when its artifact is gone.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from mydistill import io, raised_by_us, stage_functions, tracking
from mydistill.pipeline import changes, costs
from mydistill.config import PipelineConfig
from mydistill.evaluation.metrics import report_key
from mydistill.pipeline.plan import STAGE_READS, StagePlan
from tasks.progress import progress_in_prefect


# ``reads`` (the URIs handed over by the tasks before) only draw the DAG's edges: the output URI already
# names what a stage reads, and a stage flow run alone (no tasks before it) finds the pipeline's result
ARTIFACT_CACHE = (INPUTS - "parent_run_id" - "config" - "plan" - "reads") + TASK_SOURCE


def _interactive() -> bool:
    """Progress bars only on a terminal; a worker's log gets the periodic log lines instead."""
    return sys.stderr.isatty()


def fresh_unless_done(stage_task: Task, output_uri: str) -> Task:
    """``stage_task`` set to refresh its cache when its artifact (manifest) is missing.

    Prefect's cache answers a re-run with the same inputs; but if the artifact behind a cached
    result was deleted, the stage must run again instead of handing on a URI to nothing.
    """
    return stage_task.with_options(refresh_cache=io.read_manifest(output_uri) is None)


def check_reads(plan: StagePlan, stage: str, reads: tuple[str, ...] | list[str]) -> None:
    """``reads`` are the URIs that the tasks before ``stage`` returned (the flow passes each task's
    result into the next, so the Prefect UI draws the DAG's edges). Each must be an artifact the
    plan says ``stage`` reads: a flow wired wrongly fails here, naming the stage."""
    expected = {uri: name for name, uri in plan.stage_uris().items() if name in STAGE_READS[stage]}
    wrong = [uri for uri in reads if uri not in expected]
    if wrong:
        raise ValueError(f"{stage} was handed {wrong}, which it does not read; it reads {sorted(expected.values()) or 'no earlier stage'}")


CREDENTIALS_BLOCK_ENV = "MYDISTILL_CREDENTIALS_BLOCK"
DEFAULT_CREDENTIALS_BLOCK = "mydistill-credentials"
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def _transient(task: Task, task_run: Any, state: Any) -> bool:
    """Retry only what a retry can fix: a dropped connection, a timeout, a server error on the way
    (S3, the MLflow server). Our own errors (bad config, data, model, a refused or exhausted API:
    the API client already retried 429/5xx with backoff) and programming errors would fail again."""
    try:
        state.result()
    except Exception as e:  # noqa: BLE001 - deciding on the failure is the point
        if raised_by_us(e):
            return False
        import httpx

        return isinstance(e, (ConnectionError, TimeoutError, httpx.TransportError)) or (
            isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError))
        ) or type(e).__module__.startswith(("botocore", "aiobotocore", "urllib3", "requests"))
    return True


@task(
    name="load-credentials", task_run_name="load-credentials", retries=2, retry_delay_seconds=5,
    retry_condition_fn=_transient, cache_policy=NO_CACHE,
)
def load_credentials() -> list[str]:
    """Put the variables of a Prefect ``Secret`` block into this flow run's environment.

    The block (named by ``$MYDISTILL_CREDENTIALS_BLOCK``, default ``mydistill-credentials``) holds
    a JSON object of environment variables, e.g. ``{"AWS_ACCESS_KEY_ID": …, "AWS_SECRET_ACCESS_KEY":
    …}``; s3fs, MLflow and launched training processes read them from the environment. No such
    block: the environment the worker gave this run is used as it is. Only the variables' names
    are logged and returned, never their values.
    """
    logger = get_run_logger()
    name = os.environ.get(CREDENTIALS_BLOCK_ENV, DEFAULT_CREDENTIALS_BLOCK)
    if not name:
        return []
    from prefect.blocks.system import Secret

    try:
        block = Secret.load(name)
    except ValueError:
        logger.info("no Secret block %r: credentials come from the worker's environment", name)
        return []
    values = block.get()
    bad = [k for k in values if not (isinstance(k, str) and _ENV_NAME.fullmatch(k))] if isinstance(values, dict) else None
    if bad is None or bad:
        raise ValueError(
            f"Secret block {name!r} must hold a JSON object of environment variables, e.g. "
            '{"AWS_ACCESS_KEY_ID": "...", "AWS_SECRET_ACCESS_KEY": "..."}'
            + (f"; these names are not upper-case variable names: {', '.join(map(repr, bad))}" if bad else "")
        )
    os.environ.update({k: str(v) for k, v in values.items()})
    # s3fs keeps one filesystem per set of options, with the credentials it found when made:
    # drop those, so the next S3 access signs with these
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()
    logger.info("credentials from Secret block %r: %s", name, ", ".join(sorted(values)))
    return sorted(values)


@task(name="preflight", task_run_name="preflight", cache_policy=NO_CACHE)
def preflight(config: PipelineConfig) -> None:
    """Check every input of the run (data, models, S3, the API, the work dir) before any stage:
    a broken eval file fails the run in seconds, listing every problem, not after training."""
    from mydistill.pipeline.preflight import require_preflight

    require_preflight(config)
    get_run_logger().info("preflight: inputs readable")


@task(name="prepare-demo", task_run_name="prepare-demo", retries=1, retry_delay_seconds=5, retry_condition_fn=_transient)
def prepare_demo(config: PipelineConfig, plan: StagePlan) -> dict[str, str]:
    logger = get_run_logger()

    def teacher_progress(metrics: dict[str, float], step: int) -> None:
        # the first run trains the demo teacher (minutes on a CPU): say how it goes
        logger.info("demo teacher step %d: loss %.4f, %.0f tokens/s", step, metrics["loss"], metrics["tokens_per_s"])

    with progress_in_prefect("demo-teacher"):  # the first run trains the demo's teacher
        uris = stage_functions.prepare_demo(config, plan, progress=_interactive(), on_metrics=teacher_progress)
    get_run_logger().info("demo data and teacher ready: %s", uris)
    return uris


@task(name="generate", task_run_name="generate", retries=2, retry_delay_seconds=10, retry_condition_fn=_transient, cache_policy=ARTIFACT_CACHE, persist_result=True)
def generate(config: PipelineConfig, plan: StagePlan, output_uri: str, parent_run_id: str | None = None) -> str:
    with progress_in_prefect("generate"):
        manifest = stage_functions.generate(config, plan, parent_run_id, progress=_interactive())
    counts = manifest.get("counts", {})
    get_run_logger().info(
        "teacher responses at %s: %d records, %d generated by the teacher, %d reused from earlier runs",
        output_uri, counts.get("records", 0), counts.get("generated", 0), counts.get("reused", 0),
    )
    return output_uri


@task(name="mix", task_run_name="mix", retries=2, retry_delay_seconds=5, retry_condition_fn=_transient, cache_policy=ARTIFACT_CACHE, persist_result=True)
def mix(config: PipelineConfig, plan: StagePlan, output_uri: str, parent_run_id: str | None = None, reads: tuple[str, ...] = ()) -> str:
    check_reads(plan, "mix", reads)
    manifest = stage_functions.mix(config, plan, parent_run_id)
    stats = manifest["stats"]
    get_run_logger().info(
        "mixed %d examples, teacher fraction %.3f (requested %.2f) → %s",
        stats["train"], stats["teacher_fraction_realised"], stats["teacher_fraction_requested"], output_uri,
    )
    return output_uri


@task(name="signal", task_run_name="signal", cache_policy=ARTIFACT_CACHE, persist_result=True)
def teacher_signal(config: PipelineConfig, plan: StagePlan, output_uri: str, parent_run_id: str | None = None, reads: tuple[str, ...] = ()) -> str:
    check_reads(plan, "signal", reads)
    with progress_in_prefect("signal"):
        manifest = stage_functions.teacher_signal(config, plan, parent_run_id)
    counts = manifest["counts"]
    get_run_logger().info(
        "teacher signal: %d examples, %d tokens, %.1f bytes/token (k=%d entries per token: %d exact, %s) → %s",
        counts["examples"], counts["tokens"], manifest["bytes_per_token"], manifest.get("slots", manifest["k"]), manifest["k"],
        manifest["mode"], output_uri,
    )
    return output_uri


@task(name="train", task_run_name="{stage}", cache_policy=ARTIFACT_CACHE, persist_result=True)
def train(
    config: PipelineConfig, plan: StagePlan, stage: str, output_uri: str, parent_run_id: str | None = None, reads: tuple[str, ...] = (),
) -> str:
    from prefect.runtime import flow_run

    from mydistill.training.kubeflow import FLOW_RUN_LABEL

    check_reads(plan, stage, reads)
    # on a cluster job: the flow run that owns it, for the flows' cancel/crash hooks (tasks/cluster.py)
    labels = {FLOW_RUN_LABEL: str(flow_run.id)} if flow_run.id else None
    with progress_in_prefect(stage):
        manifest = stage_functions.train(
            config, plan, stage, parent_run_id, progress=_interactive(), on_line=get_run_logger().info, labels=labels,
        )
    final = manifest.get("final_metrics", {})
    get_run_logger().info("%s done → %s (loss %.4f, %.0f tokens/s)", stage, output_uri, final.get("loss", float("nan")), final.get("tokens_per_s", 0))
    return output_uri


@task(name="evaluate", task_run_name="evaluate", cache_policy=ARTIFACT_CACHE, persist_result=True)
def evaluate(config: PipelineConfig, plan: StagePlan, output_uri: str, parent_run_id: str | None = None, reads: tuple[str, ...] = ()) -> dict[str, Any]:
    check_reads(plan, "evaluate", reads)
    with progress_in_prefect("evaluate"):
        report = stage_functions.evaluate(config, plan, parent_run_id)
    mlflow_run = tracking.run_reference(parent_run_id) if parent_run_id else None
    spent = None
    if parent_run_id:  # what the stages so far cost (registration adds nothing worth counting)
        retained = report["models"].get("student", {}).get("teacher_retained")
        spent = costs.cost_lines(costs.priced(costs.total_cost(tracking.child_metrics(parent_run_id)), config.costs, retained), config.costs.currency)
    create_markdown_artifact(markdown=report_markdown(report, mlflow_run, spent), key="evaluation", description="Student vs teacher vs baseline")
    key = report_key(report.get("gate_metric", "exact"))
    get_run_logger().info("evaluation (%s): %s", key, {m: round(v[key], 3) for m, v in report["models"].items()})
    return report


# no retries: a retry after the version was created would register a duplicate version
@task(name="register", task_run_name="register")
def register(config: PipelineConfig, plan: StagePlan, report: dict[str, Any], parent_run_id: str | None = None) -> dict[str, Any]:
    decision = stage_functions.register(config, plan, report, parent_run_id)
    get_run_logger().info("quality gate %s: %s", "passed" if decision["passed"] else "failed", decision["reason"])
    if decision.get("registered"):
        create_markdown_artifact(markdown=decision_markdown(decision), key="registration", description="Model registry and quality gate")
    return decision


@task(name="open-mlflow-run", task_run_name="open-mlflow-run", retries=2, retry_delay_seconds=5, retry_condition_fn=_transient)
def open_pipeline_run(config: PipelineConfig, plan: StagePlan) -> str:
    from prefect.runtime import flow_run

    run_id, killed = stage_functions.open_pipeline_run(config, plan, tags={
        "prefect.flow_run_id": str(flow_run.id),
        # the ephemeral API has no UI: no link then (it used to read "None/flow-runs/…")
        **({"prefect.flow_run_url": str(flow_run.ui_url)} if flow_run.ui_url and not str(flow_run.ui_url).startswith("None") else {}),
    })
    if killed:
        get_run_logger().info("marked %d MLflow run(s) left RUNNING by a killed process as KILLED", len(killed))
    ref = tracking.run_reference(run_id)
    if ref["url"]:  # opens the run in MLflow's "Model training" view, not its GenAI one
        get_run_logger().info("MLflow run %s: %s", run_id, ref["url"])
        create_link_artifact(link=ref["url"], link_text=f"MLflow run {run_id}", key="mlflow-run", description="This run in MLflow (model training view)")
    else:
        get_run_logger().info("MLflow run %s in %s", run_id, ref["tracking_uri"])
    return run_id


@task(name="what-changed", task_run_name="what-changed", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=_transient)
def what_changed(config: PipelineConfig, plan: StagePlan, parent_run_id: str | None = None) -> dict[str, Any]:
    """Compare this run's input fingerprints with the last finished run's; say which stages run
    again and why (a Prefect artifact, and tags on the MLflow parent run)."""
    logger = get_run_logger()
    found = changes.what_changed(plan, changes.previous_run(config.work_dir, config.name))
    for name, fp in plan.fingerprints.items():
        moved = found["inputs"].get(name)
        logger.info("input %s: %s%s", name, fp["sha256"], f" (was {moved['before']})" if moved else "")
    for stage, s in found["stages"].items():
        logger.info("stage %s: %s (%s)", stage, s["status"], s["why"])
    create_markdown_artifact(
        markdown=changes.changes_markdown(found, plan.fingerprints), key="what-changed",
        description="Inputs whose fingerprints moved since the last run; stages re-run vs cached",
    )
    if parent_run_id:
        tracking.set_tags(parent_run_id, {
            **changes.changes_tags(found), **{f"mydistill.fp.{name}": fp["sha256"] for name, fp in plan.fingerprints.items()},
        })
    return found


@task(name="record-run", task_run_name="record-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=_transient)
def record_run(config: PipelineConfig, plan: StagePlan, parent_run_id: str | None, decision: dict[str, Any] | None) -> None:
    """Remember this run's fingerprints for the next one; log the champion's score and its history
    over past runs of this pipeline on the parent run."""
    stage_functions.record_run(config, plan, parent_run_id, decision)


@task(name="close-mlflow-run", task_run_name="close-mlflow-run", retries=2, retry_delay_seconds=5, retry_condition_fn=_transient)
def close_pipeline_run(
    config: PipelineConfig, run_id: str, report: dict[str, Any] | None, decision: dict[str, Any] | None, failed: bool = False,
    stopped: bool = False,
) -> dict[str, float]:
    """Log the summary and what the run cost on the pipeline's MLflow run, then end it (KILLED when
    ``stopped``: the flow run was cancelled); returns the cost."""
    cost = stage_functions.close_pipeline_run(config, run_id, report, decision, failed=failed, stopped=stopped)
    get_run_logger().info("run cost: %s", "; ".join(costs.cost_lines(cost, config.costs.currency)))
    return cost


def report_markdown(report: dict[str, Any], mlflow_run: dict[str, Any] | None = None, cost: list[str] | None = None) -> str:
    """The evaluation table, and where the MLflow run is (a link with a server, the run id with a local store)."""
    from mydistill.evaluation.evaluate import category_lines, comparison_lines, summary_table

    columns, rows = summary_table(report)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows if not row[0].startswith("note: ")]
    if report.get("confidence"):
        lines += ["", f"In brackets: {report['confidence']:.0%} intervals over the {report['num_examples']} questions "
                  "(Wilson for rates, bootstrap otherwise; % of teacher: paired bootstrap)."]
    if report.get("retained_undefined"):
        lines += ["", f"**% of teacher retained is undefined:** {report['retained_undefined']}."]
    lines += [f"- {line}" for line in comparison_lines(report)]
    for line in category_lines(report):
        category, _, rest = line.partition(" (")
        lines.append(f"- *{category}* ({rest}")
    if mlflow_run:
        if mlflow_run.get("url"):
            where = f"[run {mlflow_run['run_id']}]({mlflow_run['url']}) (experiment {mlflow_run['experiment_id']})"
        else:
            where = f"run `{mlflow_run['run_id']}` in `{mlflow_run['tracking_uri']}`"
        lines += ["", f"**MLflow:** {where}: parameters, training curves, plots and samples."]
    if cost:
        lines += ["", "**What this run cost:**", *[f"- {line}" for line in cost]]
    return "\n".join(lines)


def decision_markdown(decision: dict[str, Any]) -> str:
    version = f"{decision['model_name']} v{decision['version']}"
    if decision.get("version_url"):
        version = f"[{version}]({decision['version_url']})"
    outcome = f"alias `{decision['alias']}` moved to it" if decision["passed"] else "alias left where it was"
    return (
        f"**Quality gate {'passed' if decision['passed'] else 'failed'}**: {decision['reason']}.\n\n"
        f"Registered {version}; {outcome}."
    )
