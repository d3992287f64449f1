"""Preflight: every bad input of a run reported at once, each naming where and what, in seconds."""

import json
import time

import pytest

from mydistill.config import load_config
from mydistill.pipeline.preflight import PreflightError, preflight, require_preflight


def _jsonl(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())
    return str(path)


@pytest.fixture
def good_inputs(tmp_path, tiny_model_dir):
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}"} for i in range(5)])
    real = _jsonl(tmp_path / "real.jsonl", [{"prompt": f"q{i}", "answer": i} for i in range(5)])
    evals = _jsonl(tmp_path / "eval.jsonl", [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(5)])
    return {"prompts": prompts, "real": real, "eval": evals, "teacher": tiny_model_dir, "work": str(tmp_path / "runs")}


def config(inputs, *extra):
    return load_config("demo-tiny", [
        "demo=null", f"teacher.uri={inputs['teacher']}", f"data.prompts_uri={inputs['prompts']}",
        f"data.real_uri={inputs['real']}", f"data.eval_uri={inputs['eval']}", f"work_dir={inputs['work']}", *extra,
    ])


def test_good_inputs_pass(good_inputs):
    assert preflight(config(good_inputs)) == []
    require_preflight(config(good_inputs))


def test_ten_kinds_of_bad_input_are_reported_at_once_in_seconds(tmp_path, good_inputs, tiny_model_dir):
    import shutil

    # a teacher folder with a corrupt weights file, and a student folder with no tokenizer
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, teacher)
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text("{}")
    prompts = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": "fine"},
        {"prompt": 7},  # 1: a prompt that is a number
        b'{"prompt": "caf\xe9"}\n',  # 2: invalid UTF-8
        b'{"prompt": "lone \\ud800"}\n',  # 3: a lone surrogate
        {"prompt": "x" * 1_100_000},  # 4: a 1 MB record
    ])
    real = _jsonl(tmp_path / "r.jsonl", [
        {"prompt": "q", "answer": None},  # 5: a null answer
        {"prompt": "q"},  # 6: no answer field
    ])
    evals = _jsonl(tmp_path / "e.jsonl", [{"prompt": "q", "answer": "a"}, b'{"prompt": "q", "answer": \n'])  # 7: malformed JSON
    work = tmp_path / "readonly"
    work.write_text("a file, not a folder")  # 8: a work dir that cannot be written
    cfg = config(
        {"prompts": prompts, "real": real, "eval": evals, "teacher": str(teacher), "work": str(work)},
        f"student.init_uri={student}",
        "distill.extra_teachers=[{uri: " + str(tmp_path / "missing") + "}]",
    )
    start = time.perf_counter()
    problems = preflight(cfg)
    elapsed = time.perf_counter() - start
    text = "\n".join(map(str, problems))
    expected = [
        f"{prompts}:2: field 'prompt' is int (7); expected text",
        f"{prompts}:3: not valid UTF-8 (byte 0xe9 at column 16)",
        f"{prompts}:4: field 'prompt' holds a lone surrogate",
        f"{prompts}:5: a record of 1,100,015 bytes",
        f"{real}:1: field 'answer' is null; expected text",
        f"{real}:2: no 'answer' field",
        f"{evals}:2: malformed JSON line",
        f"work_dir {work}: cannot write here",
        f"teacher.uri {teacher}/model.safetensors: corrupt safetensors header",  # 9: a corrupt weights file
        f"student.init_uri {student}: no tokenizer here",  # 10: a model folder without tokenizer or weights
        f"student.init_uri {student}: no weights here",
        f"distill.extra_teachers[0].uri {tmp_path / 'missing'}: no model here",
    ]
    for line in expected:
        assert line in text, f"{line!r} not reported; got:\n{text}"
    assert elapsed < 10
    with pytest.raises(PreflightError, match=r"^12 problem\(s\) with this run's inputs:\n  "):
        require_preflight(cfg)


def test_an_unreachable_api_and_s3_endpoint_are_named(good_inputs, monkeypatch):
    monkeypatch.setenv("MYDISTILL_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    cfg = config(
        {**good_inputs, "work": "s3://bucket/runs"},
        "generate.backend=openai", "generate.api_base=http://user:secret@127.0.0.1:9/v1",
    )
    start = time.perf_counter()
    text = "\n".join(map(str, preflight(cfg)))
    assert "work_dir s3://bucket/runs: S3 at http://127.0.0.1:9 unreachable" in text
    assert "generate.api_base http://***@127.0.0.1:9/v1: unreachable" in text
    assert "secret" not in text
    assert time.perf_counter() - start < 30


def test_check_command_prints_one_line_per_problem_and_exits_2(tmp_path, good_inputs):
    import subprocess
    import sys

    from tests.flows.test_cli import REPO

    bad = _jsonl(tmp_path / "bad_eval.jsonl", [{"prompt": "q", "answer": None}])
    args = [f"teacher.uri={good_inputs['teacher']}", f"data.prompts_uri={good_inputs['prompts']}", "demo=null",
            f"data.real_uri={good_inputs['real']}", f"data.eval_uri={bad}", f"work_dir={good_inputs['work']}"]
    out = subprocess.run([sys.executable, "-m", "flows.cli", "check", "demo-tiny", *args], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2, out.stderr
    assert f"error: {bad}:1: field 'answer' is null; expected text" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
    # `run` refuses the same config before Prefect starts, in one line
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "demo-tiny", *args], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert "1 problem(s) with this run's inputs:" in out.stdout and "Traceback" not in out.stdout + out.stderr
    assert "prefect" not in out.stdout.lower()


def test_a_reachable_bucket_passes_and_a_missing_one_is_named(good_inputs, s3_endpoint):
    assert preflight(config({**good_inputs, "work": "s3://mydistill-test/runs"})) == []
    problems = [str(p) for p in preflight(config({**good_inputs, "work": "s3://no-such-bucket/runs"}))]
    assert problems == [f"work_dir s3://no-such-bucket/runs: bucket 'no-such-bucket' does not exist at {s3_endpoint}"]
