"""The operations loop as a person does it, in headless Chromium, on a stack brought up for the test.

``scripts/stack.py up`` starts moto (S3), an MLflow server with its artifacts on that S3, a
Prefect server and a worker, all on free loopback ports, with the S3 credentials in a Prefect
Secret block rather than the worker's environment, and registers the deployments with the
``demo-tiny`` preset as their parameters. Then, in the browser:

1. Prefect UI: the deployments are listed, the pipeline with its nightly schedule; open it,
   Run → Custom run, change the run's name and the teacher fraction in the parameter form
   (whose fields carry the config's descriptions), submit;
2. wait on the flow run's page until it shows Completed; open its ``evaluation`` artifact and
   follow its link to MLflow;
3. MLflow UI: the run under the changed name with its metrics, loss curves (an image read
   from S3 through the server) and the student under "Logged models"; the registered model with
   its ``champion`` alias and the quality gate's tags; the champion version's signature and its
   source model, whose MLmodel (read from S3) names the ``transformers`` flavor.

Screenshots of each page go to a temporary folder (printed; ``MYDISTILL_E2E_SCREENSHOTS`` picks
another). The stack is taken down at the end, also when something failed.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.stack_support import api as _api, running_stack, tail as _tail  # (api: the name of the Prefect API URL below)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

CHROMIUM = os.environ.get("MYDISTILL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]
RUN_TIMEOUT_S = 480


def _need_browser():
    """Skip without Chromium or playwright on a developer's machine; fail in CI, which installs both."""
    missing = None
    if not Path(CHROMIUM).exists():
        missing = f"{CHROMIUM} not found (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "playwright is not installed (pip install -e '.[dev]')"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {missing}")
        pytest.skip(missing)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("MYDISTILL_E2E_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots in {folder}")
    return folder


@pytest.fixture(scope="module")
def stack(tmp_path_factory, demo_cache):
    _need_browser()
    up_args = [
        "--bucket", "e2e", "--preset", "demo-tiny", "--set", f"demo.cache_dir={demo_cache}",
        "--timezone", "Europe/Berlin", "--credentials-block",
    ]
    with running_stack(tmp_path_factory.mktemp("stack"), up_args) as (info, up_stdout):
        # what it registered, in words: the preset, the schedule's time zone, why GPU deployments are Not Ready
        assert "deployments run preset 'demo-tiny' by default" in up_stdout, up_stdout
        assert "in time zone Europe/Berlin (active)" in up_stdout and "need a GPU worker" in up_stdout, up_stdout
        yield info


@pytest.fixture(scope="module")
def page(stack, shots):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(60_000)  # two shared cores: the UIs are slow to paint
        try:
            yield context.new_page()
        finally:
            browser.close()


def _form_field(page, label: str):
    """The input of the parameter form's property titled ``label`` (the innermost one)."""
    prop = page.locator(
        "xpath=//span[contains(@class,'schema-form-property__label') and normalize-space()="
        f"'{label} (Optional)']/ancestor::div[contains(concat(' ',@class,' '),' schema-form-property ')][1]"
    )
    return prop.locator("xpath=.//div[contains(@class,'p-label__body')]//*[self::textarea or self::input]").first


def _log_line(page, pattern: re.Pattern, timeout_s: float = 60):
    """The flow run page's last log line matching ``pattern``, scrolled into view. The page lists a
    run's log a part at a time, more as one scrolls down (a run reporting progress has hundreds of
    lines): scroll to the end until the line is there."""
    line = page.get_by_text(pattern)
    deadline = time.monotonic() + timeout_s
    while line.count() == 0 and time.monotonic() < deadline:
        page.mouse.move(700, 800)
        page.mouse.wheel(0, 20_000)  # (the End key does not load more lines)
        page.wait_for_timeout(1500)
    line.last.scroll_into_view_if_needed()
    line.last.wait_for()
    return line.last


def _dismiss_dialog(page, button: str, wait_ms: int = 8_000) -> None:
    """Click ``button`` on the dialog MLflow shows over a page on a first visit, if it comes."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    dialog = page.get_by_role("dialog").first
    try:
        dialog.wait_for(state="visible", timeout=wait_ms)
    except PlaywrightTimeout:
        return
    dialog.get_by_role("button", name=button).click()
    dialog.wait_for(state="hidden")


def test_trigger_in_prefect_ui_and_inspect_in_mlflow_ui(stack, page, shots):
    try:
        _trigger_and_inspect(stack, page, shots)
    except BaseException:
        page.screenshot(path=str(shots / "failure.png"))
        print(f"failed on {page.url}; screenshot {shots / 'failure.png'}")
        raise


def _trigger_and_inspect(stack, page, shots) -> None:
    ui, api, mlflow_url = stack["prefect_ui_url"], stack["prefect_api_url"], stack["mlflow_tracking_uri"]
    run_name = f"e2e-{uuid.uuid4().hex[:6]}"

    # --- the deployments, and the pipeline's nightly schedule in the configured time zone
    page.goto(f"{ui}/deployments")
    for name in ("nightly", "generate", "mix", "signal", "distill", "finetune", "evaluate"):
        page.get_by_role("link", name=name, exact=True).first.wait_for()  # (stage flows share the name)
    page.get_by_text("At 02:00 AM every day").wait_for()
    page.screenshot(path=str(shots / "01-prefect-deployments.png"))
    deployments = {d["name"]: d for d in _api(f"{api}/deployments/filter", {})}
    nightly = deployments["nightly"]
    assert nightly["schedules"][0]["schedule"]["timezone"] == "Europe/Berlin"
    assert nightly["schedules"][0]["active"]
    assert {deployments[n]["work_pool_name"] for n in ("signal", "distill", "finetune")} == {"mydistill-gpu"}
    mix_schema = nightly["parameter_openapi_schema"]["definitions"]["MixConfig"]["properties"]
    assert "teacher responses" in mix_schema["teacher_fraction"]["description"]

    # --- Run → Custom run, change two parameters in the form, submit
    page.get_by_role("link", name="nightly", exact=True).click()
    page.wait_for_url("**/deployments/deployment/**")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    page.wait_for_url("**/run?**")
    name_field = _form_field(page, "Name")
    assert name_field.input_value() == "demo-tiny"  # the deployment's preset is the form's default
    page.get_by_text("Run name shown in Prefect and MLflow.").wait_for()  # the config's descriptions
    name_field.fill(run_name)
    fraction = _form_field(page, "Teacher Fraction")
    assert fraction.input_value() == "0.7"
    fraction.fill("0.5")
    fraction.scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "02-prefect-custom-run.png"))
    page.get_by_role("button", name="Submit", exact=True).click()
    # the server creates the run before the page moves on: slow on two loaded cores
    page.wait_for_url(re.compile(r".*/deployments/deployment/[^/?]+(\?.*)?$"), timeout=120_000)

    # --- the run: find it, open it, wait for Completed
    runs = _api(f"{api}/flow_runs/filter", {"deployments": {"id": {"any_": [nightly["id"]]}}, "sort": "START_TIME_DESC"})
    ours = [r for r in runs if r["parameters"]["config"]["name"] == run_name]
    assert len(ours) == 1, [r["parameters"]["config"]["name"] for r in runs]
    flow_run = ours[0]
    assert flow_run["parameters"]["config"]["mix"]["teacher_fraction"] == 0.5
    page.goto(f"{ui}/runs/flow-run/{flow_run['id']}")
    deadline = time.monotonic() + RUN_TIMEOUT_S

    # --- while it trains, its log says how far (a training stage's progress line, before 100%)
    progress = re.compile(r"^([\w -]+): (\d+)/(\d+) steps \(\d+%\), .* left$")
    training_line = None
    while training_line is None and time.monotonic() < deadline:
        logs = _api(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}, "sort": "TIMESTAMP_DESC"})
        training_line = next((log["message"] for log in logs if (m := progress.match(log["message"])) and m[2] != m[3]), None)
        if training_line is None:
            assert _api(f"{api}/flow_runs/{flow_run['id']}")["state"]["type"] in ("SCHEDULED", "PENDING", "RUNNING"), (
                f"the run ended before any training progress line; worker log:\n{_tail(stack, 'worker-cpu')}")
            time.sleep(1)
    assert training_line, "no training progress line in the flow run's log"
    page.reload()
    _log_line(page, re.compile(r": \d+/\d+ (steps|responses|answers) \(\d+%\)"))  # progress lines on the page
    page.screenshot(path=str(shots / "03-prefect-flow-run-training.png"))
    while True:
        state = _api(f"{api}/flow_runs/{flow_run['id']}")["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert state == "COMPLETED", f"flow run ended {state}; worker log:\n{_tail(stack, 'worker-cpu')}"
    page.reload()
    page.get_by_text("Completed", exact=True).first.wait_for()
    _log_line(page, re.compile(r"quality gate passed"))  # the register task's log line
    page.screenshot(path=str(shots / "03-prefect-flow-run.png"))
    # each long stage's progress artifact ended at 100; the run's MLflow link opens the model training view
    artifacts = _api(f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    bars = {a["key"]: a["data"] for a in artifacts if a["type"] == "progress"}
    assert {"generate-progress", "distill-progress", "finetune-progress", "evaluate-progress"} <= set(bars), bars
    assert all(value == 100 for value in bars.values()), bars
    (link_artifact,) = [a for a in artifacts if a["key"] == "mlflow-run"]
    assert link_artifact["data"].endswith("?workflowType=machine_learning)"), link_artifact

    # --- its evaluation artifact links to the MLflow run
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("distill-progress", exact=True).first.wait_for()
    page.screenshot(path=str(shots / "03-prefect-artifacts.png"))
    page.get_by_text("evaluation", exact=True).last.click()
    page.wait_for_url("**/artifacts/artifact/**")
    link = page.get_by_role("link", name=re.compile(r"^run [0-9a-f]{32}$"))
    link.wait_for()
    page.screenshot(path=str(shots / "04-prefect-evaluation-artifact.png"))
    mlflow_run_link = link.get_attribute("href")
    assert mlflow_run_link.startswith(f"{mlflow_url}/#/experiments/")
    assert mlflow_run_link.endswith("?workflowType=machine_learning")  # MLflow's model training view, not GenAI
    parent_run_id = mlflow_run_link.split("?")[0].rsplit("/", 1)[-1]

    # --- MLflow: the run, by the name given in the Prefect form, and its metrics
    page.goto(mlflow_run_link)
    page.get_by_text(run_name).first.wait_for()
    page.get_by_text("student_exact_match").first.wait_for()
    page.get_by_text("Model training", exact=True).first.wait_for()
    page.get_by_text("Model registry", exact=True).first.wait_for()  # the model training side bar...
    assert page.get_by_text("Evaluation runs", exact=True).count() == 0  # ...not GenAI's
    page.get_by_text("teacher_exact_match").first.wait_for()
    page.get_by_text(re.compile(r"^Logged models \(1\)$")).first.wait_for()  # the student, as the run's output
    # the student is listed under its checkpoint folder's name (finetune-<key>)
    logged = page.locator("xpath=//*[normalize-space()='Logged models (1)']/ancestor::*[.//a[starts-with(normalize-space(), 'finetune-')]][1]")
    logged.get_by_role("link", name="mydistill-demo-tiny-student").first.wait_for()  # ...and its registered version
    page.screenshot(path=str(shots / "05-mlflow-run.png"))
    page.get_by_role("tab", name="Artifacts").click()  # the loss curves, as an image read from S3
    page.get_by_text("plots", exact=True).first.click()
    page.get_by_text("loss_curves.png", exact=True).first.click()
    page.get_by_text("plots/loss_curves.png").first.wait_for()
    page.wait_for_function("() => [...document.images].some(i => i.src.startsWith('blob:') && i.naturalWidth > 300)")
    page.screenshot(path=str(shots / "06-mlflow-loss-curves.png"))

    # --- MLflow: the registered model, the champion alias, the gate's decision
    page.goto(f"{mlflow_url}/#/models")
    model = page.get_by_role("link", name="mydistill-demo-tiny-student").first
    model.wait_for()
    _dismiss_dialog(page, "Try it now")  # "…the new Model Registry UI": aliases and tags, yes
    model.click()
    page.get_by_text("champion").first.wait_for()
    page.get_by_text("gate_reason").first.wait_for()
    page.screenshot(path=str(shots / "07-mlflow-model.png"))

    # --- MLflow: the champion version is a logged model of the transformers flavor, with a signature
    version = _api(f"{mlflow_url}/api/2.0/mlflow/registered-models/alias?name=mydistill-demo-tiny-student&alias=champion")
    number = version["model_version"]["version"]
    page.goto(f"{mlflow_url}/#/models/mydistill-demo-tiny-student/versions/{number}")
    page.get_by_text("Source Model").first.wait_for()
    page.get_by_text("Inputs (1)").first.wait_for()  # the signature: a prompt in...
    page.get_by_text("Outputs (1)").first.wait_for()  # ...an answer out
    page.screenshot(path=str(shots / "08-mlflow-version.png"))
    page.get_by_role("link", name=re.compile(r"^finetune-[0-9a-f]+$")).first.click()  # Source Model: the logged model's page
    page.wait_for_url("**/models/m-*")
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("MLmodel", exact=True).first.click()  # read from S3 through the server
    page.get_by_text(re.compile(r"task: text-generation")).first.wait_for()
    page.get_by_text(re.compile(r"loader_module: mlflow\.transformers")).first.wait_for()
    page.screenshot(path=str(shots / "09-mlflow-logged-model.png"))
    mlmodel = page.locator("body").inner_text()
    assert re.search(r"^flavors:\n(  .*\n)*  transformers:\n", mlmodel, re.M), mlmodel[-2000:]
    assert f"/models/{version['model_version']['source'].removeprefix('models:/')}/" in f"{page.url}/"  # the version's model

    # --- what the pages showed, checked through the APIs too
    run = _api(f"{mlflow_url}/api/2.0/mlflow/runs/get?run_id={parent_run_id}")["run"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert params["mix.teacher_fraction"] == "0.5" and params["name"] == run_name
    assert params["work_dir"].startswith("s3://e2e/runs/")
    assert tags["prefect.flow_run_id"] == flow_run["id"] and tags["mydistill.gate"] == "passed"
    artifacts = _api(f"{mlflow_url}/api/2.0/mlflow/artifacts/list?run_id={parent_run_id}&path=plots")
    assert {f["path"] for f in artifacts["files"]} >= {"plots/loss_curves.png", "plots/comparison.png"}
    assert {t["key"] for t in version["model_version"]["tags"]} >= {"gate_passed", "gate_reason", "mydistill.score"}

    # --- artifacts and MLflow's files really are on S3
    keys = _s3_keys(stack)
    assert any(k.startswith("runs/demo-tiny/finetune-") and k.endswith("model.safetensors") for k in keys)
    assert any(k.startswith("mlflow/") and k.endswith("plots/loss_curves.png") for k in keys)

    # --- and the S3 secret, which came from a Prefect block, was never written anywhere we look
    secret = _secret(stack)
    logs = _api(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}, "limit": 200})
    assert logs and not any(secret in entry["message"] for entry in logs)
    assert any("credentials from Secret block" in entry["message"] for entry in logs)
    assert secret not in json.dumps(params) + json.dumps(tags)
    assert secret not in (stack["state"] / "logs" / "worker-cpu.log").read_text()
    assert secret not in json.dumps(_api(f"{api}/flow_runs/{flow_run['id']}")["parameters"])


def _secret(stack) -> str:
    """The moto secret the stack made, read back from its Prefect block."""
    found = _api(
        f"{stack['prefect_api_url']}/block_documents/filter",
        {"block_documents": {"name": {"any_": ["mydistill-credentials"]}}, "include_secrets": True},
    )
    value = found[0]["data"]["value"]
    secret = (json.loads(value) if isinstance(value, str) else value)["AWS_SECRET_ACCESS_KEY"]
    assert len(secret) >= 16
    return secret


def _s3_keys(stack) -> list[str]:
    import boto3

    s3 = boto3.client(
        "s3", endpoint_url=stack["s3_endpoint"], region_name="us-east-1",
        aws_access_key_id="mydistill-local", aws_secret_access_key="any",  # moto checks no signature
    )
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="e2e"):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys
