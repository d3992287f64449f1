"""Fingerprints of inputs, and stage identities that cover exactly what each stage reads."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from mydistill.config import validate_config
from mydistill.fingerprint import MISSING, fingerprint, part
from mydistill.pipeline.plan import make_plan


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _touch_later(path):
    """Move a file's mtime forward (filesystems with coarse clocks would otherwise see no change)."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_a_dataset_fingerprint_moves_with_its_content_and_not_otherwise(tmp_path):
    data = tmp_path / "p.jsonl"
    _write(data, [{"prompt": "a"}])
    first = fingerprint(str(data))
    assert fingerprint(str(data)) == first and first["files"] == 1 and first["bytes"] == data.stat().st_size
    with open(data, "a") as f:
        f.write(json.dumps({"prompt": "b"}) + "\n")
    assert fingerprint(str(data))["sha256"] != first["sha256"]
    assert fingerprint(str(tmp_path / "nothing.jsonl"))["sha256"] == MISSING


def test_a_folder_of_shards_skips_temporary_files(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    _write(folder / "part-0.jsonl", [{"prompt": "a"}])
    first = fingerprint(str(folder))
    (folder / ".part-1.jsonl.tmp-1234").write_text("half written")
    assert fingerprint(str(folder)) == first
    _write(folder / "part-1.jsonl", [{"prompt": "b"}])
    assert fingerprint(str(folder))["sha256"] != first["sha256"] and fingerprint(str(folder))["files"] == 2


def test_a_model_fingerprint_tells_its_parts_apart(tmp_path, tiny_model_dir):
    model = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, model)
    first = fingerprint(str(model), kind="model")
    assert {"weights", "tokenizer", "config"} <= set(first["parts"])
    _touch_later(model / "model.safetensors")
    moved = fingerprint(str(model), kind="model")
    assert part(moved, "weights") != part(first, "weights")
    assert part(moved, "tokenizer") == part(first, "tokenizer") and moved["sha256"] != first["sha256"]

    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] }}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    templated = fingerprint(str(model), kind="model")
    assert part(templated, "chat_template") != part(moved, "chat_template")


@pytest.fixture
def user_inputs(tmp_path, tiny_model_dir):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, teacher)
    for name in ("prompts", "real", "eval"):
        _write(tmp_path / f"{name}.jsonl", [{"prompt": f"{name} {i}", "answer": str(i)} for i in range(5)])

    def config(*overrides: tuple[str, object]):
        data = {
            "work_dir": str(tmp_path / "runs"), "teacher": {"uri": str(teacher)},
            "data": {n: str(tmp_path / f"{n.split('_')[0]}.jsonl") for n in ("prompts_uri", "real_uri", "eval_uri")},
        }
        for key, value in overrides:
            node = data
            *path, last = key.split(".")
            for p in path:
                node = node.setdefault(p, {})
            node[last] = value
        return validate_config(data)

    config.root = tmp_path
    return config


def _changed(before, after) -> set[str]:
    return {s for s, uri in before.stage_uris().items() if after.stage_uris().get(s) != uri}


def test_appending_prompts_reruns_what_reads_them_and_not_the_baseline(user_inputs):
    before = make_plan(user_inputs())
    assert make_plan(user_inputs()) == before  # unchanged inputs: the same artifacts
    with open(user_inputs.root / "prompts.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "new"}) + "\n")
    assert _changed(before, make_plan(user_inputs())) == {"generate", "mix", "distill", "finetune", "evaluate"}


def test_new_labelled_rows_rerun_mix_baseline_and_everything_after(user_inputs):
    before = make_plan(user_inputs())
    with open(user_inputs.root / "real.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "new", "answer": "1"}) + "\n")
    assert _changed(before, make_plan(user_inputs())) == {"mix", "distill", "finetune", "baseline", "evaluate"}


def test_a_teacher_with_new_weights_in_place_keeps_the_baseline(user_inputs):
    before = make_plan(user_inputs())
    _touch_later(user_inputs.root / "teacher" / "model.safetensors")
    assert _changed(before, make_plan(user_inputs())) == {"generate", "mix", "distill", "finetune", "evaluate"}


def test_eval_data_changes_only_the_evaluation(user_inputs):
    before = make_plan(user_inputs())
    with open(user_inputs.root / "eval.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "new", "answer": "1"}) + "\n")
    assert _changed(before, make_plan(user_inputs())) == {"evaluate"}


@pytest.mark.parametrize("override", [("distill.loss.temperature", 4.0), ("distill.cross_tokenizer.method", "sequence")])
def test_distill_only_settings_do_not_retrain_the_baseline(user_inputs, override):
    before, after = make_plan(user_inputs()), make_plan(user_inputs(override))
    assert after.baseline_uri == before.baseline_uri
    assert after.distill_uri != before.distill_uri


def test_settings_the_baseline_shares_with_stage_one_retrain_it(user_inputs):
    before, after = make_plan(user_inputs()), make_plan(user_inputs(("distill.lr", 1e-4)))
    assert after.baseline_uri != before.baseline_uri


def test_object_store_fingerprints_use_etags(s3_endpoint):
    from mydistill import io

    uri = f"s3://mydistill-test/fp-{time.time_ns()}"
    io.write_records(f"{uri}/part-0.jsonl", [{"prompt": "a"}])
    first = fingerprint(uri)
    assert first["files"] == 1 and first["sha256"] != MISSING and fingerprint(uri) == first
    io.write_records(f"{uri}/part-0.jsonl", [{"prompt": "b"}])  # same size, other bytes: another ETag
    fs, _ = io.filesystem(uri)
    fs.invalidate_cache()
    assert fingerprint(uri)["sha256"] != first["sha256"]
