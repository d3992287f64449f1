"""The same artifact I/O against a real S3 API (moto server on loopback)."""

import pytest

from mydistill import io


@pytest.fixture
def bucket(s3_endpoint, request):
    return f"s3://mydistill-test/{request.node.name}"


def test_records_and_manifest_on_s3(bucket):
    rows = [{"prompt": "p", "response": "r"}]
    io.write_records(f"{bucket}/data/part-00000.jsonl", rows)
    io.write_records(f"{bucket}/data/part-00001.parquet", rows)
    assert io.read_records(f"{bucket}/data") == rows + rows
    io.write_manifest(f"{bucket}/data", stage="test", inputs={"x": 1})
    assert io.manifest_matches(f"{bucket}/data", {"x": 1})


def test_malformed_line_on_s3_names_the_uri(bucket):
    io.write_text(f"{bucket}/bad.jsonl", '{"a": 1}\n{oops}\n')
    with pytest.raises(io.DataError, match=r"s3://.*bad.jsonl:2"):
        io.read_records(f"{bucket}/bad.jsonl")


def test_localize_downloads_a_folder(bucket, tmp_path):
    io.write_text(f"{bucket}/model/config.json", "{}")
    io.write_text(f"{bucket}/model/sub/x.txt", "x")
    local = io.localize(f"{bucket}/model", cache_root=str(tmp_path))
    assert (tmp_path / local.split("/")[-1] / "config.json").exists()
    assert open(f"{local}/sub/x.txt").read() == "x"
