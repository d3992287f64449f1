"""What changed since the last run: moved fingerprints, and which stages run again and why."""

from __future__ import annotations

import json

from mydistill import io
from mydistill.pipeline import changes
from mydistill.pipeline.plan import make_plan

from tests.mydistill.test_fingerprint import user_inputs  # noqa: F401 (fixture)


def _finish(plan):
    for uri in plan.stage_uris().values():
        io.write_manifest(uri, stage="test", inputs={})


def test_a_data_drop_names_the_inputs_and_the_stages_it_reruns(user_inputs):  # noqa: F811
    cfg = user_inputs()
    first = make_plan(cfg)
    assert changes.what_changed(first, None)["stages"]["generate"]["why"] == "no earlier run to compare with"
    _finish(first)
    changes.record_run(cfg.work_dir, cfg.name, first)

    quiet = changes.what_changed(make_plan(cfg), changes.previous_run(cfg.work_dir, cfg.name))
    assert quiet["inputs"] == {} and {s["status"] for s in quiet["stages"].values()} == {"cached"}
    assert changes.changes_tags(quiet)["mydistill.stages_run"] == "-"

    with open(user_inputs.root / "prompts.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "new"}) + "\n")
    found = changes.what_changed(make_plan(cfg), changes.previous_run(cfg.work_dir, cfg.name))
    assert set(found["inputs"]) == {"prompts"}
    assert found["stages"]["generate"] == {"status": "runs", "why": "changed: prompts"}
    assert found["stages"]["finetune"]["why"] == "changed: prompts"
    assert found["stages"]["baseline"]["status"] == "cached"
    tags = changes.changes_tags(found)
    assert tags["mydistill.changed_inputs"] == "prompts" and tags["mydistill.stages_cached"] == "baseline"
    markdown = changes.changes_markdown(found, make_plan(cfg).fingerprints)
    assert "| generate | runs | changed: prompts |" in markdown and "| baseline | cached |" in markdown


def test_a_config_change_and_a_deleted_output_are_told_apart(user_inputs):  # noqa: F811
    cfg = user_inputs()
    first = make_plan(cfg)
    _finish(first)
    changes.record_run(cfg.work_dir, cfg.name, first)
    io.remove(first.evaluate_uri)
    stages = changes.what_changed(make_plan(user_inputs(("distill.steps", 7))), changes.previous_run(cfg.work_dir, cfg.name))["stages"]
    assert stages["distill"]["why"] == "settings changed" and stages["generate"]["status"] == "cached"
    again = changes.what_changed(first, changes.previous_run(cfg.work_dir, cfg.name))["stages"]
    assert again["evaluate"]["why"] == "output missing (deleted or unfinished)"


def test_evaluating_in_another_precision_runs_evaluate_again(user_inputs):  # noqa: F811
    cfg = user_inputs()
    first = make_plan(cfg)
    _finish(first)
    changes.record_run(cfg.work_dir, cfg.name, first)
    stages = changes.what_changed(make_plan(user_inputs(("student.dtype", "bfloat16"))), changes.previous_run(cfg.work_dir, cfg.name))["stages"]
    assert stages["evaluate"]["why"] == "settings changed"
    assert {stages[s]["status"] for s in ("generate", "mix", "distill", "finetune", "baseline")} == {"cached"}
    assert make_plan(user_inputs(("teacher.dtype", "float32"))).evaluate_uri != first.evaluate_uri
