"""Nightly runs on the user's own data files: a data drop between two runs at the same URIs is
picked up (only new prompts go to the teacher), a night with nothing new is answered from cache,
and a teacher changed in place re-runs generation and everything that reads it.

demo-tiny sizes, the demo teacher copied to a folder the test owns; under Prefect's test harness,
tracked in MLflow.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from mydistill import io
from mydistill.config import load_config
from mydistill.demo.task import make_examples
from mydistill.pipeline.plan import make_plan

from tests.flows.test_pipeline import task_states

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STAGES = ("generate", "mix", "distill", "finetune", "baseline", "evaluate")


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _append(path, rows):
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@pytest.fixture(scope="module")
def nightly(tmp_path_factory):
    """A config on user data files and a user teacher folder; returns (config, paths)."""
    from mydistill.demo.bootstrap import ensure_teacher

    root = tmp_path_factory.mktemp("nightly")
    eval_set = make_examples(30, seed=1)
    real = make_examples(40, seed=2, exclude={e["prompt"] for e in eval_set})
    held = {e["prompt"] for e in eval_set + real}
    prompts = [{"id": e["id"], "prompt": e["prompt"]} for e in make_examples(160, seed=3, exclude=held)]
    paths = {name: root / f"{name}.jsonl" for name in ("prompts", "real", "eval")}
    for name, rows in (("prompts", prompts), ("real", real), ("eval", eval_set)):
        _append(paths[name], rows)
    config = load_config("demo-tiny", [
        f"work_dir={root}/runs", f"demo.cache_dir={root}/cache", "name=nightly-test",
        f"data.prompts_uri={paths['prompts']}", f"data.real_uri={paths['real']}", f"data.eval_uri={paths['eval']}",
        f"teacher.uri={root}/teacher", "registry.model_name=nightly-test-student", "tracking.experiment=nightly-test",
    ])
    shutil.copytree(ensure_teacher(config.demo), root / "teacher")
    paths["teacher"] = root / "teacher"
    paths["held"] = held | {p["prompt"] for p in prompts}
    return config, paths


def run_pipeline(config):
    from flows.pipeline_flow import distill_pipeline

    start = time.perf_counter()
    state = distill_pipeline(config=config, return_state=True)
    assert state.is_completed(), state
    return state.result(), state.state_details.flow_run_id, time.perf_counter() - start


def _parent_tags(result):
    from mlflow import MlflowClient

    return MlflowClient().get_run(result["mlflow_run_id"]).data.tags


def test_nightly_runs_pick_up_a_data_drop_skip_a_quiet_night_and_follow_a_new_teacher(harness, nightly):
    from mlflow import MlflowClient
    from prefect.artifacts import Artifact

    config, paths = nightly

    # night 1: everything runs
    first, flow_run_id, _ = run_pipeline(config)
    assert all(task_states(flow_run_id)[s] == "Completed" for s in STAGES)
    assert first["decision"]["registered"]
    plan1 = make_plan(config)

    # the data drop: 40 prompts and 10 labelled rows appended to the same files
    new_prompts = make_examples(40, seed=4, exclude=paths["held"])
    _append(paths["prompts"], [{"id": e["id"], "prompt": e["prompt"]} for e in new_prompts])
    new_real = make_examples(10, seed=5, exclude=paths["held"] | {e["prompt"] for e in new_prompts})
    _append(paths["real"], new_real)

    # night 2: only the new prompts go to the teacher; the mix has the new rows; both stages train again
    second, flow_run_id, _ = run_pipeline(config)
    plan2 = make_plan(config)
    states = task_states(flow_run_id)
    assert all(states[s] == "Completed" for s in STAGES), states
    counts = io.read_manifest(plan2.generate_uri)["counts"]
    assert (counts["generated"], counts["reused"], counts["records"]) == (40, 160, 200)
    mix = io.read_manifest(plan2.mix_uri)["stats"]
    assert mix["val"] + mix["task_train"] == 50
    real_in_mix = {r["prompt"] for name in ("task_train.jsonl", "val.jsonl") for r in io.read_records(io.join(plan2.mix_uri, name))}
    assert {e["prompt"] for e in new_real} <= real_in_mix
    assert plan2.distill_uri != plan1.distill_uri and plan2.finetune_uri != plan1.finetune_uri
    assert second["decision"]["registered"] and second["decision"]["version"] != first["decision"]["version"]
    assert second["decision"]["reason"]  # the gate decided, and said why
    tags = _parent_tags(second)
    assert tags["mydistill.changed_inputs"] == "prompts,real"
    assert set(tags["mydistill.stages_run"].split(",")) == set(STAGES)
    assert any(a.path == "plots/champion_history.png" for a in MlflowClient().list_artifacts(second["mlflow_run_id"], "plots"))

    # night 3: nothing changed: every stage answered from cache, nothing registered
    third, flow_run_id, seconds = run_pipeline(config)
    states = task_states(flow_run_id)
    assert all(states[s] == "Cached" for s in STAGES), states
    assert third["report"] == second["report"]
    assert third["decision"]["reused"] and third["decision"]["version"] == second["decision"]["version"]  # nothing new registered
    tags = _parent_tags(third)
    assert tags["mydistill.changed_inputs"] == "-" and tags["mydistill.stages_run"] == "-"
    print(f"\nnight with nothing new: {seconds:.1f} s for the whole flow")
    markdown = Artifact.get("what-changed")
    assert markdown is not None and "| generate | cached |" in markdown.data

    # night 4: the teacher replaced in place: generation reuses nothing; what reads the teacher re-runs
    from mydistill.models import load_model

    teacher = load_model(str(paths["teacher"]))
    with __import__("torch").no_grad():
        teacher.get_output_embeddings().weight.mul_(1.01)  # a slightly different teacher, same tokenizer
    teacher.save_pretrained(paths["teacher"])
    fourth, flow_run_id, _ = run_pipeline(config)
    plan4 = make_plan(config)
    states = task_states(flow_run_id)
    counts = io.read_manifest(plan4.generate_uri)["counts"]
    assert (counts["generated"], counts["reused"]) == (200, 0)
    assert all(states[s] == "Completed" for s in ("generate", "mix", "distill", "finetune", "evaluate")), states
    assert states["baseline"] == "Cached"  # it reads the real data and the teacher's tokenizer only
    assert _parent_tags(fourth)["mydistill.changed_inputs"] == "teacher"
