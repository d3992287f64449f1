"""The sweep of what killed runs left: only dead writers' leftovers, and a finished stage's checkpoints."""

import os

from mydistill import io
from mydistill.storage import debris


def test_sweep_removes_only_what_dead_writers_left(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    # a temporary folder of the test's own: the machine's /tmp may hold real debris of other runs (a
    # cancelled training's checkpoint staging), which the sweep would rightly remove too
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
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
    removed = debris.sweep_debris(str(artifact))
    assert sorted(removed) == sorted([str(orphan), str(staging), scratch])
    assert mine.exists() and other_stage.exists() and (artifact / "part-00000.jsonl").exists()


def test_sweep_removes_checkpoints_of_a_finished_stage_unless_a_run_holds_them(tmp_path):
    from mydistill.training.checkpoints import lock_checkpoints, unlock_checkpoints

    out = tmp_path / "distill-abc"
    checkpoints = tmp_path / "distill-abc.checkpoints"
    (checkpoints / "step10").mkdir(parents=True)
    assert debris.sweep_debris(str(out)) == []  # not finished: these are what a re-run resumes from
    io.write_manifest(str(out), stage="distill", inputs={})
    held = lock_checkpoints(str(checkpoints))
    assert debris.sweep_debris(str(out)) == []  # a live run holds them
    unlock_checkpoints(str(checkpoints), held)
    assert debris.sweep_debris(str(out)) == [str(checkpoints)] and not checkpoints.exists()
