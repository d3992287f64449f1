import json

import pytest

from mydistill import io
from mydistill.config import MixConfig
from mydistill.mix import mix_datasets, run_mix


def teacher_rows(n, start=0, **extra):
    return [
        {"id": f"t{i}", "prompt": f"q{i}", "response": f"a{i}", "status": "ok", **extra}
        for i in range(start, start + n)
    ]


def real_rows(n, start=1000):
    return [{"id": f"r{i}", "prompt": f"q{i}", "answer": f"gold{i}"} for i in range(start, start + n)]


def test_default_ratio_is_realised():
    result = mix_datasets(teacher_rows(700), real_rows(100), teacher_fraction=0.7, val_fraction=0.1, seed=1)
    assert result.stats["teacher_fraction_realised"] == pytest.approx(0.7, abs=0.002)
    assert len(result.train) == 1000  # 700 teacher once, real upsampled to 300
    assert {r["source"] for r in result.train} == {"teacher", "real"}


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
def test_configurable_ratio(fraction):
    result = mix_datasets(teacher_rows(200), real_rows(200), teacher_fraction=fraction, total=100, val_fraction=0.0)
    assert result.stats["teacher_fraction_realised"] == pytest.approx(fraction)
    assert len(result.train) == 100


def test_without_upsampling_the_mix_shrinks_and_has_no_repeats():
    result = mix_datasets(teacher_rows(700), real_rows(60), teacher_fraction=0.7, val_fraction=0.0, upsample=False)
    assert result.stats["teacher_fraction_realised"] == pytest.approx(0.7, abs=0.01)
    ids = [r["id"] for r in result.train]
    assert len(ids) == len(set(ids))
    assert result.stats["train_real"] <= 60


def test_failed_empty_and_duplicate_generations_are_dropped_and_counted():
    teacher = teacher_rows(10)
    teacher += [{"prompt": "x1", "response": "", "status": "ok"}]
    teacher += [{"prompt": "x2", "response": "cut", "status": "truncated"}]
    teacher += [{"prompt": "x3", "response": None, "status": "failed"}]
    teacher += [{"prompt": "q0", "response": "again", "status": "ok"}]  # duplicate prompt
    teacher += [{"prompt": "q1000", "response": "teacher says", "status": "ok"}]  # also in real data
    result = mix_datasets(teacher, real_rows(20), teacher_fraction=0.5, val_fraction=0.0)
    s = result.stats
    assert s["dropped_teacher_empty"] == 1
    assert s["dropped_teacher_truncated"] == 1
    assert s["dropped_teacher_failed"] == 1
    assert s["dropped_teacher_duplicate"] == 2
    assert s["unique_teacher"] == 10
    teacher_prompts = {r["prompt"] for r in result.train if r["source"] == "teacher"}
    assert "q1000" not in teacher_prompts


def test_validation_holds_only_real_records_never_trained_on():
    result = mix_datasets(teacher_rows(100), real_rows(50), val_fraction=0.2, seed=3)
    val_prompts = {r["prompt"] for r in result.val}
    assert len(result.val) == 10
    assert all(r["source"] == "real" for r in result.val)
    assert not val_prompts & {r["prompt"] for r in result.train}
    assert not val_prompts & {r["prompt"] for r in result.task_train}


def test_same_seed_same_mix_other_seed_other_mix():
    a = mix_datasets(teacher_rows(100), real_rows(50), seed=1).train
    b = mix_datasets(teacher_rows(100), real_rows(50), seed=1).train
    c = mix_datasets(teacher_rows(100), real_rows(50), seed=2).train
    assert a == b and a != c


def test_the_same_teacher_records_in_another_file_order_give_the_same_mix():
    # responses reused from the cache are written before the ones generated in the run, so a fresh run
    # and a run that reused half its responses hold the same records in another order
    teacher = teacher_rows(100)
    reordered = teacher[50:] + teacher[:50][::-1]
    a = mix_datasets(teacher, real_rows(50), seed=3)
    b = mix_datasets(reordered, real_rows(50), seed=3)
    assert a.train == b.train and a.val == b.val and a.task_train == b.task_train
    assert [r["prompt"] for r in a.train] != sorted(r["prompt"] for r in a.train)  # still shuffled
    # a prompt that is not text is named, not left to fail the ordering
    with pytest.raises(io.DataError, match=r"gen/: teacher record 't1': field 'prompt' is int \(5\); expected text"):
        mix_datasets([teacher[0], {**teacher[1], "prompt": 5}], real_rows(5), teacher_uri="gen/")


def test_empty_after_filtering_is_a_clear_error():
    failed = [{"prompt": f"p{i}", "response": "", "status": "failed"} for i in range(5)]
    with pytest.raises(io.DataError, match="no usable teacher responses"):
        mix_datasets(failed, real_rows(5), teacher_uri="gen/")


def test_real_record_without_answer_names_the_field():
    with pytest.raises(io.DataError, match=r"real.jsonl: record 2 has no 'answer' field"):
        mix_datasets(teacher_rows(3), [{"prompt": "a", "answer": "b"}, {"prompt": "c"}], real_uri="real.jsonl")


def test_run_mix_writes_files_and_manifest_and_skips_when_done(tmp_path):
    io.write_records(str(tmp_path / "gen" / "part-00000.jsonl"), teacher_rows(70))
    io.write_records(str(tmp_path / "real.jsonl"), real_rows(40))
    out = str(tmp_path / "mix")
    manifest = run_mix(str(tmp_path / "gen"), str(tmp_path / "real.jsonl"), out, MixConfig(seed=0))
    assert manifest["stats"]["teacher_fraction_realised"] == pytest.approx(0.7, abs=0.01)
    assert manifest["files"]["train.jsonl"]["count"] == len(io.read_records(f"{out}/train.jsonl"))
    mtime = (tmp_path / "mix" / "train.jsonl").stat().st_mtime_ns
    assert run_mix(str(tmp_path / "gen"), str(tmp_path / "real.jsonl"), out, MixConfig(seed=0)) == manifest
    assert (tmp_path / "mix" / "train.jsonl").stat().st_mtime_ns == mtime


def test_run_mix_failure_leaves_no_artifact(tmp_path):
    io.write_records(str(tmp_path / "gen.jsonl"), [{"prompt": "a", "response": "", "status": "ok"}])
    io.write_records(str(tmp_path / "real.jsonl"), real_rows(5))
    with pytest.raises(io.DataError):
        run_mix(str(tmp_path / "gen.jsonl"), str(tmp_path / "real.jsonl"), str(tmp_path / "mix"))
    assert not (tmp_path / "mix").exists()


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "q", "answer": None}, r"real.jsonl: record 1: field 'answer' is null; expected text"),
    ({"prompt": 7, "answer": "a"}, r"real.jsonl: record 1: field 'prompt' is int \(7\); expected text"),
    ({"prompt": "q\ud800", "answer": "a"}, r"real.jsonl:1: a string holds a lone surrogate"),
])
def test_real_rows_that_are_not_text_are_refused_by_file_record_and_field(tmp_path, row, message):
    real = tmp_path / "real.jsonl"
    real.write_text(json.dumps(row) + "\n")
    teacher = tmp_path / "teacher.jsonl"
    io.write_records(str(teacher), [{"prompt": "p", "response": "r"}])
    with pytest.raises(io.DataError, match=message):
        run_mix(str(teacher), str(real), str(tmp_path / "mix"))
    assert not (tmp_path / "mix").exists()


def test_a_numeric_answer_is_its_text_and_invalid_utf8_is_named_by_line(tmp_path):
    real = tmp_path / "real.jsonl"
    real.write_text('{"prompt": "2+2", "answer": 4}\n')
    teacher = tmp_path / "teacher.jsonl"
    io.write_records(str(teacher), [{"prompt": "p", "response": "r"}])
    run_mix(str(teacher), str(real), str(tmp_path / "mix"), MixConfig(val_fraction=0.0))
    assert {r["response"] for r in io.read_records(str(tmp_path / "mix" / "task_train.jsonl"))} == {"4"}
    real.write_bytes(b'{"prompt": "ok", "answer": "a"}\n{"prompt": "caf\xe9", "answer": "a"}\n')
    with pytest.raises(io.DataError, match=r"real.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        io.read_records(str(real))
