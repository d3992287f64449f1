"""deploy/prefect.yaml and what scripts/stack.py makes of it (quick: no server, no browser)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
STAGE_FLOWS = {
    "generate": "generate_flow", "mix": "mix_flow", "signal": "signal_flow", "distill": "distill_flow",
    "finetune": "finetune_flow", "baseline": "baseline_flow", "evaluate": "evaluate_flow",
}


def _spec() -> dict:
    return yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())


def _stack_module():
    spec = importlib.util.spec_from_file_location("stack", REPO / "scripts" / "stack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_deployment_for_the_pipeline_and_for_each_stage():
    deployments = {d["name"]: d for d in _spec()["deployments"]}
    assert deployments["nightly"]["entrypoint"] == "flows/pipeline_flow.py:distill_pipeline"
    for stage, flow in STAGE_FLOWS.items():
        assert deployments[stage]["entrypoint"] == f"flows/stage_flows.py:{flow}"
    for d in deployments.values():
        path, func = d["entrypoint"].split(":")
        assert f"def {func}(" in (REPO / path).read_text()
        assert d["parameters"] == {}  # the flows' default: configs/demo.yaml


def test_every_stage_flow_has_a_deployment():
    import flows.stage_flows
    from prefect import Flow

    defined = {name for name, obj in vars(flows.stage_flows).items() if isinstance(obj, Flow)}
    assert defined == set(STAGE_FLOWS.values())
    deployed = {d["entrypoint"] for d in _spec()["deployments"]}
    assert {f"flows/stage_flows.py:{name}" for name in defined} <= deployed


def test_teacher_and_training_stages_go_to_the_gpu_pool_the_rest_to_the_cpu_pool():
    pools = {d["name"]: d["work_pool"]["name"] for d in _spec()["deployments"]}
    assert pools == {
        "nightly": "mydistill-cpu", "generate": "mydistill-cpu", "mix": "mydistill-cpu", "signal": "mydistill-gpu",
        "distill": "mydistill-gpu", "finetune": "mydistill-gpu", "baseline": "mydistill-gpu", "evaluate": "mydistill-cpu",
    }


def test_the_pipeline_runs_nightly():
    (schedule,) = {d["name"]: d for d in _spec()["deployments"]}["nightly"]["schedules"]
    assert schedule == {"cron": "0 2 * * *", "timezone": "UTC", "active": True}


def test_the_parameter_form_carries_the_config_descriptions():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline_flow import distill_pipeline

    schema = parameter_schema(distill_pipeline).model_dump_for_openapi()
    definitions = schema["definitions"]
    assert definitions["PipelineConfig"]["properties"]["work_dir"]["description"] == "Root for all artifacts (local path or s3://)."
    assert "teacher responses" in definitions["MixConfig"]["properties"]["teacher_fraction"]["description"]
    assert "the alias points to now" in definitions["RegisterConfig"]["properties"]["beat_champion"]["description"]
    assert schema["properties"]["config"]["default"]["name"] == "demo"


def test_the_form_has_no_none_switches_for_optional_fields_and_presets_still_validate():
    """Optional fields render as plain inputs (no 'Property is type "None"' switch); what the
    deployments hold (a preset, nulls included) passes Prefect's own validation, a wrong type does not."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    from flows.pipeline_flow import distill_pipeline
    from mydistill.config import load_config

    schema = parameter_schema(distill_pipeline).model_dump_for_openapi()
    switches = sorted(
        f"{model}.{name}" for model, d in schema["definitions"].items() for name, p in d.get("properties", {}).items()
        if {"type": "null"} in p.get("anyOf", [])
    )
    # only optional sections keep one (there, on or off is the choice), fields whose default is not
    # None, where null is a value of its own (no category; a chunk size chosen from the shapes), and
    # student.init.layers, whose form offers a choice of kinds anyway (a list of blocks, or auto)
    assert switches == [
        "DataConfig.category_field", "EvaluateConfig.judge", "LossConfig.chunk_size", "LossConfig.hidden",
        "LossConfig.step_by_step", "PipelineConfig.demo", "StudentInit.layers",
    ]
    uri = schema["definitions"]["TeacherSpec"]["properties"]["uri"]
    assert uri["type"] == "string" and "default" not in uri and uri["description"]
    for preset in ("demo", "demo-tiny", "qwen-7b-to-0.5b"):
        values = {"config": load_config(preset).model_dump(mode="json")}
        assert validate(values, schema, raise_on_error=False) == [], preset
    values["config"]["distill"]["steps"] = "many"
    assert validate(values, schema, raise_on_error=False)


def test_stack_renders_time_zone_preset_and_pools(tmp_path):
    stack = _stack_module()
    args = argparse.Namespace(
        preset="demo-tiny", set=["distill.steps=3"], work_dir="s3://bucket/runs", timezone="Europe/Berlin", cron=None,
        no_schedule=False, cpu_pool="cpu-a", gpu_pool="gpu-b", pipeline_pool="gpu-b",
    )
    rendered = yaml.safe_load(stack.render_deployments(stack.Stack(tmp_path), args).read_text())
    deployments = {d["name"]: d for d in rendered["deployments"]}
    assert deployments["nightly"]["schedules"][0]["timezone"] == "Europe/Berlin"
    assert deployments["nightly"]["work_pool"]["name"] == "gpu-b"
    assert deployments["mix"]["work_pool"]["name"] == "cpu-a" and deployments["distill"]["work_pool"]["name"] == "gpu-b"
    config = deployments["mix"]["parameters"]["config"]
    assert config["name"] == "demo-tiny" and config["distill"]["steps"] == 3
    assert config["work_dir"] == "s3://bucket/runs/demo-tiny"
    assert "definitions" not in rendered and json.dumps(rendered)  # plain data, anchors resolved


def test_stack_down_with_nothing_running_says_so(tmp_path, capsys):
    assert _stack_module().main(["--state-dir", str(tmp_path), "down"]) == 0
    assert "nothing recorded as running" in capsys.readouterr().out


def test_stack_up_says_what_it_registered_and_why_gpu_deployments_are_not_ready(tmp_path):
    stack = _stack_module()
    args = argparse.Namespace(
        preset=stack.DEFAULT_PRESET, set=None, work_dir="s3://bucket/runs", timezone="Europe/Berlin", cron=None,
        no_schedule=False, cpu_pool="mydistill-cpu", gpu_pool="mydistill-gpu", pipeline_pool=None, no_worker=False, gpu_worker=False,
    )
    rendered = yaml.safe_load(stack.render_deployments(stack.Stack(tmp_path), args).read_text())
    lines = stack.registration_summary(rendered, args)
    assert lines[0].startswith("deployments run preset 'demo-tiny' by default (config 'demo-tiny', work_dir s3://bucket/runs/demo-tiny)")
    assert "schedule: nightly at cron '0 2 * * *' in time zone Europe/Berlin (active)" in lines
    assert "pool mydistill-cpu: nightly, generate, mix, evaluate (worker started here)" in lines
    assert "pool mydistill-gpu: signal, distill, finetune, baseline (no worker here)" in lines
    assert lines[-1].startswith("signal, distill, finetune, baseline need a GPU worker: the Prefect UI shows them Not Ready")
    # the deployment's own page says it too
    distill = next(d for d in rendered["deployments"] if d["name"] == "distill")
    assert distill["description"].endswith(stack.gpu_pool_note("mydistill-gpu"))
    with_gpu = stack.registration_summary(rendered, argparse.Namespace(**{**vars(args), "gpu_worker": True}))
    assert "pool mydistill-gpu: signal, distill, finetune, baseline (worker started here)" in with_gpu
    assert not any("need a GPU worker" in line for line in with_gpu)


def test_stack_restart_without_a_prefect_server_of_its_own_says_so_in_one_line(tmp_path, capsys):
    assert _stack_module().main(["--state-dir", str(tmp_path), "restart", "prefect"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"stack: error: the stack in {tmp_path} started no Prefect server (it used --prefect-api-url, or is down)"]


def test_stack_supervise_starts_a_worker_again_when_it_stops_itself_and_stops_on_sigterm(tmp_path, monkeypatch):
    import argparse
    import signal
    import sys

    stack = _stack_module()
    monkeypatch.setattr(stack, "FIRST_RUN_S", 0.1)  # (10 s: a first run shorter than that is a broken command)
    monkeypatch.setattr(stack, "RESTART_AFTER_S", 0)
    runs = tmp_path / "runs"
    # a worker that stops itself twice (as one does after a long server outage), then is stopped from outside
    child = (
        "import os, signal, sys, time; p = sys.argv[1]; open(p, 'a').write('x'); n = len(open(p).read()); time.sleep(0.2)\n"
        "if n < 3: sys.exit(1)\n"
        "os.kill(os.getppid(), signal.SIGTERM); time.sleep(30)"
    )
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        code = stack.supervise(argparse.Namespace(argv=["--", sys.executable, "-c", child, str(runs)]))
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
    assert runs.read_text() == "xxx" and code == -signal.SIGTERM  # the SIGTERM passed on to it ended it
    monkeypatch.setattr(stack, "FIRST_RUN_S", 10)
    assert stack.supervise(argparse.Namespace(argv=["--", sys.executable, "-c", "raise SystemExit(4)"])) == 4  # broken: given up
