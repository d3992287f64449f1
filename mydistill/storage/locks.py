"""One writer per artifact: a lock beside each stage's output, for local paths and ``s3://``.

Two pipeline runs of one config and work dir (last night's still training when tonight's starts,
two people pressing "Run") compute the same stage outputs. Each stage takes the lock of its output
before it writes: the second run waits for the first and then finds the stage finished (its
manifest matches) instead of training the same stage twice at once.

* **Local paths** (and shared file systems): an ``flock`` on ``<artifact>.lock``. The kernel drops it
  when the holder dies, so a killed run never blocks its re-run. The file stays (deleting a lock file
  others may have open is a race); it holds the last owner, as JSON, for the waiting message.
* **Object stores**: an object ``<artifact>.lock`` created with a conditional PUT (``If-None-Match:
  *``: exactly one creator wins), holding its owner. The owner rewrites it every ``heartbeat_s``
  (``If-Match`` its last ETag, so an owner whose lock was taken over learns it). A waiter that sees
  the same ETag for ``stale_after_s`` takes the lock over (a ``DELETE`` with ``If-Match``, then the
  conditional PUT again): its owner died without releasing it. Staleness is judged by the waiter's
  own clock on an unchanged ETag, so clocks of different machines need not agree.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from mydistill import io

LOCK_SUFFIX = ".lock"
log = logging.getLogger("mydistill")


class LockTimeout(RuntimeError):
    """Waited longer than allowed for another run to release an artifact's lock."""


def lock_uri(artifact_uri: str) -> str:
    """Where the lock of ``artifact_uri`` lives: beside it, ``<artifact>.lock``."""
    return artifact_uri.rstrip("/") + LOCK_SUFFIX


def _owner(token: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": token, "since": time.time(), "heartbeat": time.time()}


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another run"
    since = time.strftime("%H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (since {since})"


@contextlib.contextmanager
def artifact_lock(
    artifact_uri: str, *, what: str = "stage", poll_s: float = 1.0, heartbeat_s: float = 15.0,
    stale_after_s: float = 120.0, wait_s: float | None = None, on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the lock of ``artifact_uri`` inside the block, waiting for another holder first.

    ``what`` names the work in the waiting message (e.g. ``distill``); ``on_wait`` receives that
    message once, when the lock is found taken (default: the ``mydistill`` logger). ``wait_s``
    bounds the wait (:class:`LockTimeout`); ``None`` waits as long as the holder lives.
    ``heartbeat_s`` and ``stale_after_s`` apply to object stores (see the module's docstring).
    """
    say = on_wait or log.info
    lock = _ObjectLock(artifact_uri, heartbeat_s) if io.is_remote(artifact_uri) else _FileLock(artifact_uri)
    started = time.monotonic()
    waited = False
    seen: tuple[str | None, float] = (None, started)  # the holder's ETag and since when we see it unchanged
    while not lock.try_acquire():
        holder, etag = lock.holder()
        if not waited:
            say(f"{what}: {lock.uri} is held by {_describe(holder)}; waiting for it to finish")
            waited = True
        now = time.monotonic()
        if etag != seen[0]:
            seen = (etag, now)
        elif etag is not None and now - seen[1] >= stale_after_s and lock.take_over(etag):
            say(f"{what}: took over {lock.uri} from {_describe(holder)}: no heartbeat for {stale_after_s:.0f} s")
            continue
        if wait_s is not None and now - started >= wait_s:
            raise LockTimeout(f"{lock.uri}: still held by {_describe(holder)} after {wait_s:.0f} s; is that run alive?")
        time.sleep(poll_s)
    if waited:
        say(f"{what}: {lock.uri} is ours after {time.monotonic() - started:.0f} s")
    try:
        yield
    finally:
        lock.release()


class _FileLock:
    def __init__(self, artifact_uri: str) -> None:
        self.uri = lock_uri(artifact_uri.removeprefix("file://"))
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        import fcntl

        os.makedirs(os.path.dirname(self.uri) or ".", exist_ok=True)
        fd = os.open(self.uri, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        owner = json.dumps(_owner(uuid.uuid4().hex)).encode()
        os.pwrite(fd, owner, 0)  # then cut what a longer earlier owner left: the file is never empty in between
        os.ftruncate(fd, len(owner))
        self.fd = fd
        return True

    def holder(self) -> tuple[dict[str, Any] | None, str | None]:
        # no ETag: a dead holder's flock is gone, so a local lock is never stale. A holder that has just taken the
        # flock may not have written itself yet (or not cut an earlier, longer owner): read again briefly.
        for attempt in range(5):
            try:
                with open(self.uri) as f:
                    return json.loads(f.read()), None
            except (OSError, ValueError):
                time.sleep(0.02 * (attempt + 1))
        return None, None

    def take_over(self, etag: str) -> bool:
        return False

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


class _ObjectLock:
    def __init__(self, artifact_uri: str, heartbeat_s: float) -> None:
        self.uri = lock_uri(artifact_uri)
        self.fs, path = io.filesystem(self.uri)
        self.bucket, self.key = path.split("/", 1)
        self.heartbeat_s = heartbeat_s
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.stop = threading.Event()
        self.beats: threading.Thread | None = None

    def _put(self, **condition: str) -> str:
        body = json.dumps(_owner(self.token)).encode()
        return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body, **condition)["ETag"]

    def try_acquire(self) -> bool:
        try:
            self.etag = self._put(IfNoneMatch="*")
        except Exception as e:  # noqa: BLE001 - only a lost race is an answer; anything else propagates
            if not _precondition_failed(e):
                raise
            # a PUT retried after a lost answer finds its own first attempt: that is ours too
            holder, etag = self.holder()
            if not holder or holder.get("token") != self.token:
                return False
            self.etag = etag
        self.beats = threading.Thread(target=self._beat, name=f"heartbeat {self.key}", daemon=True)
        self.beats.start()
        return True

    def _beat(self) -> None:
        while not self.stop.wait(self.heartbeat_s):
            try:
                self.etag = self._put(IfMatch=self.etag or "*")
            except Exception as e:  # noqa: BLE001 - a heartbeat must not kill the stage; say why it stopped
                if _precondition_failed(e):
                    holder, etag = self.holder()
                    if holder and holder.get("token") == self.token:
                        self.etag = etag  # a retried beat found its own first attempt
                        continue
                    log.warning("%s: the lock was taken over by another run (no heartbeat seen in time); "
                                "this run no longer holds it", self.uri)
                    self.etag = None
                    return
                log.warning("%s: heartbeat failed (%s); retrying", self.uri, e)

    def holder(self) -> tuple[dict[str, Any] | None, str | None]:
        path = f"{self.bucket}/{self.key}"
        try:
            etag = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)["ETag"]
            body = self.fs.cat_file(path)
        except FileNotFoundError:
            return None, None
        try:
            return json.loads(body), etag
        except ValueError:
            return None, etag  # an unreadable owner is still a held lock

    def take_over(self, etag: str) -> bool:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except FileNotFoundError:
            return True  # released meanwhile
        except Exception as e:  # noqa: BLE001
            if _precondition_failed(e):
                return False  # it beat again, or another waiter took it first
            raise
        return True

    def release(self) -> None:
        self.stop.set()
        if self.beats is not None:
            self.beats.join()
        if self.etag is None:
            return  # taken over: the lock object is someone else's now
        with contextlib.suppress(Exception):
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag)


def _precondition_failed(error: BaseException) -> bool:
    """A conditional request lost (412 PreconditionFailed, or 409 ConditionalRequestConflict from a
    concurrent conditional write), however s3fs / botocore wrapped it."""
    seen: BaseException | None = error
    while seen is not None:
        text = f"{type(seen).__name__} {seen}"
        if any(mark in text for mark in ("PreconditionFailed", "Precondition Failed", "412", "ConditionalRequestConflict")):
            return True
        response = getattr(seen, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
