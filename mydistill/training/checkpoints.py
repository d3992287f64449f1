"""Checkpoints: periodic engine states for resume, and the finished student as a Hugging Face folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import torch

from mydistill import io


def latest_tag(directory: str) -> str | None:
    latest = os.path.join(directory, "latest")
    return open(latest).read().strip() if os.path.exists(latest) else None


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
    with tempfile.TemporaryDirectory(prefix="mydistill-ckpt-") as tmp:
        student.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = sorted(os.listdir(tmp))
        if io.is_remote(output_uri):
            io.remove(output_uri)
            io.copy_dir(tmp, output_uri)
        else:
            target = output_uri.removeprefix("file://")
            staging = f"{target.rstrip('/')}.tmp-{os.getpid()}"
            shutil.copytree(tmp, staging)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(staging, target)
    return io.write_manifest(output_uri, stage=stage, inputs=inputs, files=files, **content)
