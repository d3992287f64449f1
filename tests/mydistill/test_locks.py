"""One writer per artifact (mydistill.storage.locks): local flock and S3 conditional-put locks."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid

import pytest

from mydistill.storage import locks


def _overlapping_holders(uri: str, workers: int = 3, hold_s: float = 0.3) -> tuple[list[tuple[str, str]], list[str]]:
    """``workers`` threads each hold ``uri``'s lock for ``hold_s``; returns the enter/leave order and the waiting messages."""
    events: list[tuple[str, str]] = []
    said: list[str] = []

    def work(name: str) -> None:
        with locks.artifact_lock(uri, what=name, poll_s=0.05, heartbeat_s=0.1, on_wait=said.append):
            events.append(("in", name))
            time.sleep(hold_s)
            events.append(("out", name))

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return events, said


def _assert_one_at_a_time(events: list[tuple[str, str]], workers: int) -> None:
    assert len(events) == 2 * workers
    for i in range(0, len(events), 2):  # every "in" is followed by the same worker's "out"
        assert events[i][0] == "in" and events[i + 1] == ("out", events[i][1]), events


def test_local_lock_lets_one_holder_in_at_a_time(tmp_path):
    events, said = _overlapping_holders(str(tmp_path / "runs" / "distill-abc"))
    _assert_one_at_a_time(events, 3)
    assert any("held by pid" in line and "waiting" in line for line in said), said
    assert (tmp_path / "runs" / "distill-abc.lock").exists()


def _hold_and_die(path: str, ready) -> None:
    lock = locks._FileLock(path)
    assert lock.try_acquire()
    ready.set()
    time.sleep(60)  # killed before this ends


def test_local_lock_of_a_killed_holder_is_free_at_once(tmp_path):
    uri = str(tmp_path / "mix-abc")
    ready = multiprocessing.get_context("fork").Event()
    holder = multiprocessing.get_context("fork").Process(target=_hold_and_die, args=(uri, ready))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(locks.LockTimeout, match=r"mix-abc\.lock: still held by pid \d+"):
            with locks.artifact_lock(uri, poll_s=0.05, wait_s=0.3):
                pass
        holder.kill()
        holder.join()
        started = time.monotonic()
        with locks.artifact_lock(uri, poll_s=0.05, wait_s=5):
            assert time.monotonic() - started < 2
    finally:
        holder.kill()


def test_s3_lock_lets_one_holder_in_at_a_time(s3_endpoint):
    uri = f"s3://mydistill-test/locks-{uuid.uuid4().hex[:8]}/distill-abc"
    events, said = _overlapping_holders(uri)
    _assert_one_at_a_time(events, 3)
    assert any("held by pid" in line for line in said), said
    from mydistill import io

    assert not io.exists(locks.lock_uri(uri)), "a released S3 lock leaves no object"


def test_s3_lock_with_no_heartbeat_is_taken_over(s3_endpoint):
    uri = f"s3://mydistill-test/locks-{uuid.uuid4().hex[:8]}/train"
    dead = locks._ObjectLock(uri, heartbeat_s=3600)
    assert dead.try_acquire()  # its owner "dies": no heartbeat, no release
    said: list[str] = []
    started = time.monotonic()
    with locks.artifact_lock(uri, poll_s=0.05, stale_after_s=0.5, on_wait=said.append):
        took = time.monotonic() - started
    assert 0.5 <= took < 5, took
    assert any("took over" in line and "no heartbeat for" in line for line in said), said
    dead.release()  # a late release of a taken-over lock deletes nothing of the new owner's


def test_s3_lock_with_a_heartbeat_is_not_taken_over(s3_endpoint):
    uri = f"s3://mydistill-test/locks-{uuid.uuid4().hex[:8]}/train"
    alive = locks._ObjectLock(uri, heartbeat_s=0.1)
    assert alive.try_acquire()
    try:
        with pytest.raises(locks.LockTimeout, match="still held by"):
            with locks.artifact_lock(uri, poll_s=0.05, stale_after_s=0.5, wait_s=1.5):
                pass
    finally:
        alive.release()


def test_s3_conditional_put_retried_after_a_lost_answer_is_still_ours(s3_endpoint):
    """A flaky store can lose the answer to a PUT that succeeded; the retry then meets its own lock."""
    uri = f"s3://mydistill-test/locks-{uuid.uuid4().hex[:8]}/gen"
    lock = locks._ObjectLock(uri, heartbeat_s=3600)
    assert lock.try_acquire()
    lock.stop.set()
    lock.beats.join()
    lock.beats = None
    assert lock.try_acquire(), "its own first attempt's object is the same lock"
    other = locks._ObjectLock(uri, heartbeat_s=3600)
    assert not other.try_acquire()
    lock.release()
