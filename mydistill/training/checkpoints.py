"""Checkpoints: periodic engine states for resume, and the finished student as a Hugging Face folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any

import torch

from mydistill import io
from mydistill.training.job import TrainingError


def latest_tag(directory: str) -> str | None:
    latest = os.path.join(directory, "latest")
    return open(latest).read().strip() if os.path.exists(latest) else None


def lock_checkpoints(directory: str) -> int:
    """Hold an exclusive lock on the checkpoint folder ``directory`` for this process's life.

    Two runs writing one folder would interleave their steps and the resumed run would train on
    another run's state; the second one fails here instead, naming the first. The lock is a
    ``flock`` on ``<directory>.lock`` (released by the kernel when the holder dies, so a killed
    run never blocks its re-run). Returns the file descriptor to keep; see :func:`unlock_checkpoints`.
    """
    import fcntl

    path = directory.rstrip("/") + ".lock"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise TrainingError(
            f"{directory}: another training run (pid {holder}) is writing checkpoints here; "
            "wait for it to finish or stop it before starting this one"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def unlock_checkpoints(directory: str, fd: int) -> None:
    """Remove the lock file of :func:`lock_checkpoints` and release it (the run is finished)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(directory.rstrip("/") + ".lock")
    os.close(fd)


def prune_checkpoints(directory: str, keep: int) -> None:
    """Keep the ``keep`` newest ``step<N>`` checkpoints in ``directory`` (call on rank 0 only)."""
    tags = sorted(
        (d for d in os.listdir(directory) if d.startswith("step") and os.path.isdir(os.path.join(directory, d))),
        key=lambda d: int(d.removeprefix("step")),
    )
    for tag in tags[:-keep]:
        shutil.rmtree(os.path.join(directory, tag), ignore_errors=True)


def save_checkpoint(
    student: Any, tokenizer: Any, output_uri: str, *, stage: str, inputs: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None, **content: Any,
) -> dict[str, Any]:
    """Write the student as a Hugging Face folder (safetensors + tokenizer), then its manifest.

    The folder is assembled locally and moved (or uploaded) into place before the manifest is
    written, so a reader never takes a half-written checkpoint for a finished one.
    """
    with io.full_disk_named(output_uri), tempfile.TemporaryDirectory(prefix=io.temp_prefix("ckpt")) as tmp:
        student.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = sorted(os.listdir(tmp))
        if io.is_remote(output_uri):
            io.remove(output_uri)
            io.copy_dir(tmp, output_uri)
        else:
            target = output_uri.removeprefix("file://")
            staging = f"{target.rstrip('/')}.tmp-{os.getpid()}"
            try:
                shutil.copytree(tmp, staging)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)  # a half copy would keep a full disk full
                raise
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(staging, target)
    return io.write_manifest(output_uri, stage=stage, inputs=inputs, files=files, **content)
