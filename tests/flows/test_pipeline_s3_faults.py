"""The pipeline on a flaky S3 (tests/faulty_proxy.py in front of moto), through the CLI: an outage
that begins when the distill stage starts writing fails the run in one line naming the bucket; the
re-run, on a store that still fails one request in five (500, 503, reset), resumes from the
finished stages and completes, every artifact matching its manifest, one version registered."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from tests.conftest import REPO
from tests.faulty_proxy import FaultyProxy


@pytest.mark.slow
def test_an_outage_mid_run_fails_in_one_line_and_the_rerun_on_a_flaky_store_resumes(s3_endpoint, tmp_path):
    work_dir = f"s3://mydistill-test/flaky-{uuid.uuid4().hex[:8]}"
    with FaultyProxy(s3_endpoint, stall_s=1.5) as proxy:
        env = {
            **os.environ, "PYTHONPATH": str(REPO), "MYDISTILL_S3_ENDPOINT_URL": proxy.endpoint,
            "MYDISTILL_S3_READ_TIMEOUT": "1", "MYDISTILL_S3_MAX_ATTEMPTS": "4",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PREFECT_HOME": str(tmp_path / "prefect"),
        }
        args = [
            sys.executable, "-m", "flows.cli", "run", "demo-tiny", f"work_dir={work_dir}", f"demo.cache_dir={tmp_path}/cache",
            "registry.model_name=flaky-student", "tracking.experiment=flaky",
        ]
        outage = {"on": False}

        def down_from_distill(i: int, line: str) -> str | None:
            outage["on"] = outage["on"] or (line.startswith("PUT") and "/distill-" in line)  # its first write
            return "503" if outage["on"] else None

        proxy.schedule = down_from_distill
        first = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        out = first.stdout + first.stderr
        assert first.returncode == 2, out[-3000:]
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "S3 bucket 'mydistill-test'" in errors[0] and "kept failing after retries" in errors[0], errors
        assert "Traceback" not in out
        # the flow run's own state (what the Prefect UI shows) carries the same line, not botocore's raw error
        failed = [line for line in out.splitlines() if "Finished in state Failed(" in line]
        assert any("StoreUnavailable: S3 bucket 'mydistill-test'" in line for line in failed), failed

        proxy.every(5, ("500", "503", "reset"))  # timeouts cost seconds each: tests/mydistill/test_io_s3_faults.py has them
        second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        out = second.stdout + second.stderr
        assert second.returncode == 0, out[-3000:]
        assert "registered flaky-student version 1" in out
        assert "Task run 'generate' - Finished in state Cached" in out, "generation resumed from the first run's shards"
        assert set(proxy.injected) >= {"500", "503", "reset"}, proxy.injected

    # past the proxy: no temporary or lock object left, and the records match what the manifests recorded
    from s3fs import S3FileSystem

    from mydistill import io

    S3FileSystem.clear_instance_cache()
    fs, root = io.filesystem(work_dir)
    keys = fs.find(root)
    assert not [k for k in keys if ".tmp-" in k or k.endswith(".lock")], "no temporary or lock object left"
    done = {k.removeprefix(root + "/").split("/", 1)[0] for k in keys if k.endswith("/manifest.json")}
    assert {p.split("-", 1)[0] for p in done} >= {"generate", "mix", "distill", "finetune", "evaluate"}, done
    for stage_dir in done:
        uri = io.join(work_dir, stage_dir)
        manifest = io.read_manifest(uri)
        if stage_dir.startswith("generate"):
            assert io.records_sha256(io.read_records(uri)) == manifest["records_sha256"]
        if stage_dir.startswith("mix"):
            for name, entry in manifest["files"].items():
                assert io.records_sha256(io.read_records(io.join(uri, name))) == entry["sha256"], name
