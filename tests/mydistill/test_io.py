import json
import os

import pytest

from mydistill import io


def test_jsonl_and_parquet_round_trip(tmp_path):
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    for name in ("x.jsonl", "x.parquet"):
        uri = str(tmp_path / name)
        assert io.write_records(uri, rows) == 2
        assert io.read_records(uri) == rows


def test_folder_of_shards_is_read_in_order(tmp_path):
    io.write_records(str(tmp_path / "d" / "part-00001.jsonl"), [{"i": 2}])
    io.write_records(str(tmp_path / "d" / "part-00000.jsonl"), [{"i": 1}])
    assert [r["i"] for r in io.read_records(str(tmp_path / "d"))] == [1, 2]


def test_malformed_line_reports_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n\n{"prompt": broken}\n')
    with pytest.raises(io.DataError, match=r"bad.jsonl:3: malformed JSON line"):
        io.read_records(str(path))
    path.write_text('["not", "an", "object"]\n')
    with pytest.raises(io.DataError, match=r"bad.jsonl:1: expected a JSON object"):
        io.read_records(str(path))


def test_missing_dataset(tmp_path):
    with pytest.raises(io.DataError, match="dataset not found"):
        io.read_records(str(tmp_path / "missing.jsonl"))


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.jsonl"

    def rows():
        yield {"a": 1}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        with io.atomic_open(str(target), "w") as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError):
        io.write_records(str(target), rows())
    assert os.listdir(tmp_path) == []


def test_manifest_matches_only_same_inputs(tmp_path):
    uri = str(tmp_path / "stage")
    io.write_manifest(uri, stage="mix", inputs={"a": 1}, count=3)
    assert io.manifest_matches(uri, {"a": 1})["count"] == 3
    assert io.manifest_matches(uri, {"a": 2}) is None
    manifest = json.loads((tmp_path / "stage" / "manifest.json").read_text())
    assert manifest["library_version"] and manifest["inputs_sha256"]


def test_sweep_removes_only_what_dead_writers_left(tmp_path):
    import subprocess
    import sys
    import tempfile

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout)
    artifact = tmp_path / "generate-abc"
    artifact.mkdir()
    (artifact / "part-00000.jsonl").write_text("{}\n")
    mine = artifact / f".part-00001.jsonl.tmp-{os.getpid()}-deadbeef"  # a live writer's (this process)
    mine.write_text("half")
    orphan = artifact / f".part-00002.jsonl.tmp-{dead}-0badf00d"
    orphan.write_text("half")
    staging = tmp_path / f"generate-abc.tmp-{dead}"
    staging.mkdir()
    other_stage = tmp_path / f"mix-abc.tmp-{dead}"  # another artifact's: not this stage's to sweep
    other_stage.mkdir()
    scratch = tempfile.mkdtemp(prefix=f"mydistill-job-{dead}-")
    removed = io.sweep_debris(str(artifact))
    assert sorted(removed) == sorted([str(orphan), str(staging), scratch])
    assert mine.exists() and other_stage.exists() and (artifact / "part-00000.jsonl").exists()


def test_sweep_removes_checkpoints_of_a_finished_stage_unless_a_run_holds_them(tmp_path):
    from mydistill.training.checkpoints import lock_checkpoints, unlock_checkpoints

    out = tmp_path / "distill-abc"
    checkpoints = tmp_path / "distill-abc.checkpoints"
    (checkpoints / "step10").mkdir(parents=True)
    assert io.sweep_debris(str(out)) == []  # not finished: these are what a re-run resumes from
    io.write_manifest(str(out), stage="distill", inputs={})
    held = lock_checkpoints(str(checkpoints))
    assert io.sweep_debris(str(out)) == []  # a live run holds them
    unlock_checkpoints(str(checkpoints), held)
    assert io.sweep_debris(str(out)) == [str(checkpoints)] and not checkpoints.exists()
