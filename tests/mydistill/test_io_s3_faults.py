"""A flaky object store (tests/faulty_proxy.py in front of moto): 500/503, reset connections and
timeouts for a while are retried with backoff and the objects come out byte-identical; a lasting
outage fails in one line naming the bucket, and the same write succeeds once the store is back."""

from __future__ import annotations

import os
import uuid

import pytest

from mydistill import io
from tests.faulty_proxy import FaultyProxy


@pytest.fixture
def flaky_s3(s3_endpoint, monkeypatch):
    from s3fs import S3FileSystem

    with FaultyProxy(s3_endpoint, stall_s=1.0) as proxy:
        monkeypatch.setenv("MYDISTILL_S3_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("MYDISTILL_S3_READ_TIMEOUT", "0.5")  # a stalled answer is a timeout in 0.5 s
        monkeypatch.setenv("MYDISTILL_S3_CONNECT_TIMEOUT", "1")
        S3FileSystem.clear_instance_cache()
        yield proxy
    S3FileSystem.clear_instance_cache()


def _objects(s3_endpoint: str, prefix: str) -> dict[str, bytes]:
    """The objects under ``prefix`` as moto holds them, read past the proxy."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mydistill-test", Prefix=prefix).get("Contents", [])]
    return {k.removeprefix(prefix): s3.get_object(Bucket="mydistill-test", Key=k)["Body"].read() for k in keys}


def test_transient_faults_are_retried_and_objects_are_byte_identical(flaky_s3, s3_endpoint, tmp_path):
    rows = [{"prompt": f"q{i}", "response": "é" * i} for i in range(50)]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(300_000))
    (folder / "config.json").write_text('{"a": 1}')
    local, remote = str(tmp_path / "local"), f"s3://mydistill-test/flaky-{uuid.uuid4().hex[:8]}"

    flaky_s3.every(3)  # one request in three fails: 500, 503, reset, timeout in turn
    for base in (local, remote):
        io.write_records(io.join(base, "data.jsonl"), rows)
        io.write_records(io.join(base, "data.parquet"), rows)
        io.write_json(io.join(base, "manifest.json"), {"rows": len(rows)})
        io.copy_dir(str(folder), io.join(base, "ckpt"))
        assert io.read_records(io.join(base, "data.jsonl")) == rows
        assert io.read_records(io.join(base, "data.parquet")) == rows
    assert set(flaky_s3.injected) == {"500", "503", "reset", "timeout"}, flaky_s3.injected

    stored = _objects(s3_endpoint, remote.removeprefix("s3://mydistill-test/") + "/")
    expected = {
        os.path.relpath(os.path.join(d, f), local): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(local) for f in files
    }
    assert stored.keys() == expected.keys()
    assert all(stored[k] == expected[k] for k in expected), [k for k in expected if stored[k] != expected[k]]


@pytest.mark.parametrize("fault", ["503", "reset"])
def test_a_lasting_outage_fails_in_one_line_naming_the_bucket_and_a_retry_after_it_succeeds(flaky_s3, s3_endpoint, monkeypatch, fault):
    monkeypatch.setenv("MYDISTILL_S3_MAX_ATTEMPTS", "2")
    uri = f"s3://mydistill-test/outage-{uuid.uuid4().hex[:8]}/manifest.json"
    flaky_s3.outage(fault)
    with pytest.raises(Exception) as raised:
        io.write_json(uri, {"done": True})
    assert io.store_unavailable(raised.value)
    message = str(io.store_unavailable_error(raised.value, [uri, "/local/path"]))
    assert message.startswith(f"S3 bucket 'mydistill-test' at {flaky_s3.endpoint} kept failing after retries"), message
    assert "\n" not in message and "run again" in message
    assert _objects(s3_endpoint, uri.removeprefix("s3://mydistill-test/")) == {}, "nothing half-written"

    flaky_s3.heal()
    io.write_json(uri, {"done": True})
    assert io.read_json(uri) == {"done": True}


def test_a_missing_object_is_not_an_outage(flaky_s3):
    with pytest.raises(io.DataError) as raised:
        io.read_json(f"s3://mydistill-test/nothing-{uuid.uuid4().hex[:8]}.json")
    assert not io.store_unavailable(raised.value)
