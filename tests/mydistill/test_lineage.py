"""The lineage guard: a stage joining artifacts made from another teacher or tokenizer stops with
one message naming both sides, and writes nothing; ``allow_lineage_mismatch`` lets it through."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from mydistill import io, stage_functions
from mydistill.config import validate_config
from mydistill.lineage import LineageMismatch
from mydistill.pipeline.plan import make_plan

from tests.conftest import save_tiny_model


@pytest.fixture
def inputs(tmp_path, tiny_model_dir):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, teacher)
    for name in ("prompts", "real", "eval"):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.write(json.dumps({"prompt": "a b", "answer": "b a"}) + "\n")

    def config(**overrides):
        data = {
            "work_dir": str(tmp_path / "runs"), "teacher": {"uri": str(teacher)},
            "data": {f"{n}_uri": str(tmp_path / f"{n}.jsonl") for n in ("prompts", "real", "eval")},
            **overrides,
        }
        return validate_config(data)

    config.teacher = teacher
    return config


def _upstream(cfg, plan):
    """The generate and mix artifacts as the pipeline leaves them (manifests are what is joined)."""
    io.write_manifest(plan.generate_uri, stage="generate", inputs={}, lineage=stage_functions.teacher_lineage(plan))
    io.write_manifest(plan.mix_uri, stage="mix", inputs={}, files={})


def _nothing_written(uri):
    return not os.path.exists(uri) and not os.path.exists(uri + ".checkpoints")


def test_responses_by_a_teacher_replaced_since_are_refused(inputs, demo_tokenizer):
    cfg = inputs()
    plan = make_plan(cfg)
    _upstream(cfg, plan)
    generated_by = plan.fingerprints["teacher"]["sha256"]
    save_tiny_model(inputs.teacher, demo_tokenizer, seed=7)  # the teacher changed in place after generation
    with pytest.raises(LineageMismatch) as err:
        stage_functions.train(cfg, plan, "distill")
    message = str(err.value)
    assert generated_by in message and plan.generate_uri in message  # their side
    assert str(inputs.teacher) in message and "distilled online" in message  # our side
    assert "allow_lineage_mismatch" in message
    assert _nothing_written(plan.distill_uri)

    allowed = cfg.model_copy(update={"allow_lineage_mismatch": True})
    assert len(stage_functions.check_lineage(allowed, plan, "distill")) == 1  # let through, and said


@pytest.mark.parametrize("which", ["other tokenizer", "other teacher"])
def test_a_signal_store_by_another_teacher_or_tokenizer_is_refused(inputs, tmp_path, which):
    other_store = str(tmp_path / "other-store")
    cfg = inputs(
        signal={"enabled": True, "extra_uris": [other_store]},
        distill={"loss": {"teacher_weights": [0.5, 0.5]}},
    )
    plan = make_plan(cfg)
    _upstream(cfg, plan)
    ours = stage_functions.teacher_lineage(plan)
    io.write_manifest(plan.signal_uri, stage="signal", inputs={}, tokenizer_sha256=ours["tokenizer"], lineage=ours)
    if which == "other tokenizer":
        io.write_manifest(other_store, stage="signal", inputs={}, tokenizer_sha256="f" * 64, lineage={"teacher": "elsewhere"})
        bad = other_store
    else:  # this run's own store, computed by a teacher that is not this one
        io.write_manifest(other_store, stage="signal", inputs={}, tokenizer_sha256=ours["tokenizer"], lineage={"teacher": "elsewhere"})
        io.write_manifest(plan.signal_uri, stage="signal", inputs={}, tokenizer_sha256=ours["tokenizer"], lineage={**ours, "teacher": "0123456789abcdef"})
        bad = plan.signal_uri
    with pytest.raises(LineageMismatch, match="teacher-signal store") as err:
        stage_functions.train(cfg, plan, "distill")
    assert bad in str(err.value) and "this run's student" in str(err.value)
    assert ("tokenizer" if which == "other tokenizer" else "teacher") in str(err.value).split("differ in")[1].split("(")[0]
    assert _nothing_written(plan.distill_uri)


def test_a_stage_two_init_trained_with_another_tokenizer_is_refused(inputs, tiny_model_dir):
    cfg = inputs()
    plan = make_plan(cfg)
    _upstream(cfg, plan)
    shutil.copytree(tiny_model_dir, plan.distill_uri)
    io.write_manifest(plan.distill_uri, stage="distill", inputs={"lineage": {"tokenizer": "e" * 64, "vocab_size": 7}})
    with pytest.raises(LineageMismatch, match="stage-1 checkpoint") as err:
        stage_functions.train(cfg, plan, "finetune")
    assert plan.distill_uri in str(err.value) and "eeeeeeeeeeee" in str(err.value)
    assert _nothing_written(plan.finetune_uri)
