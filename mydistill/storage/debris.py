"""What killed runs leave behind, and the sweep that clears it before a stage runs again.

Temporary names carry the writer's pid (:func:`mydistill.io.tmp_suffix`, :func:`mydistill.io.temp_prefix`),
so that what a killed writer left can be told from what a live one is still writing.
"""

from __future__ import annotations

import contextlib
import os
import re

from mydistill import io


def sweep_debris(artifact_uri: str) -> list[str]:
    """Remove what killed runs of this artifact's stage left behind; returns what was removed.

    Only this artifact's own leftovers, and only those whose writer is gone: temporary files
    inside it, staging folders beside it, its periodic checkpoints once the artifact is finished,
    and ``mydistill-*`` folders of dead processes in the system temp dir. Object stores need no
    sweep (their writes are single PUTs).
    """
    import shutil
    import tempfile

    removed: list[str] = []
    if io.is_remote(artifact_uri):
        return removed
    target = artifact_uri.removeprefix("file://").rstrip("/")
    parent, name = os.path.dirname(target) or ".", os.path.basename(target)
    candidates = []
    if os.path.isdir(target):
        candidates += [os.path.join(target, f) for f in os.listdir(target) if f.startswith(".") and _owned_by_the_dead(f, io.TMP_NAME)]
    if os.path.isdir(parent):
        candidates += [
            os.path.join(parent, f) for f in os.listdir(parent)
            if f.startswith(f"{name}.tmp-") and _owned_by_the_dead(f, io.TMP_NAME)
        ]
    checkpoints = f"{target}.checkpoints"
    if os.path.isdir(checkpoints) and os.path.exists(os.path.join(target, io.MANIFEST_NAME)) and not _locked(f"{checkpoints}.lock"):
        candidates += [checkpoints, f"{checkpoints}.lock"]  # finished: killed between its manifest and the clean-up
    scratch = tempfile.gettempdir()
    candidates += [os.path.join(scratch, f) for f in os.listdir(scratch) if _owned_by_the_dead(f, io.TMP_DIR_NAME)]
    for path in candidates:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        else:
            continue
        removed.append(path)
    return removed


def _owned_by_the_dead(name: str, pattern: re.Pattern[str]) -> bool:
    match = pattern.search(name)
    return bool(match) and int(match.group(1)) != os.getpid() and not io.pid_alive(int(match.group(1)))


def _locked(path: str) -> bool:
    """Whether a live process holds the ``flock`` on ``path``."""
    import fcntl

    if not os.path.exists(path):
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False
