"""What every training process needs before anything else: DeepSpeed imported the way this machine
wants it, and a worker that dies with its parent. Small, and importing nothing of the project's
own, so that engines, teachers and the launcher can all use it without importing each other.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings

import torch


def import_deepspeed():
    """DeepSpeed, set up for this machine (every worker imports it through here)."""
    if not torch.cuda.is_available():
        # told so, DeepSpeed takes the CPU accelerator without warning that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("DeepSpeed is not installed: run `make setup` (or `pip install deepspeed`)") from e
    if not torch.cuda.is_available():
        # the shared-memory comm op is JIT-compiled on first use and needs a compiler toolchain;
        # on CPU the gloo backend does the same job
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # ZeRO-3 inside DeepSpeed calls these torch collectives, deprecated under their old names; the
    # FutureWarning is DeepSpeed's to fix and came once per step and rank into the Prefect log
    warnings.filterwarnings(
        "ignore", category=FutureWarning,
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
    )
    return deepspeed


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    Called first thing in every training worker, and in the launcher's child before it execs:
    torchrun and DeepSpeed start workers in sessions of their own, so a kill of the task's or the
    launcher's process group would otherwise leave workers training on, holding a GPU and writing
    into the checkpoint folder a re-run resumes from. A parent already gone (the race before the
    call) ends this process at once. Elsewhere than Linux it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
