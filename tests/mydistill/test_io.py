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


@pytest.mark.parametrize(("uri", "name"), [
    ("s3://bucket/runs/teacher-7b/", "teacher-7b"), ("s3://bucket/runs/teacher-7b", "teacher-7b"),
    ("/data/prompts.jsonl", "prompts.jsonl"), ("relative/dir/", "dir"), ("plain", "plain"),
])
def test_basename_is_the_last_part_of_a_uri_or_path(uri, name):
    assert io.basename(uri) == name
