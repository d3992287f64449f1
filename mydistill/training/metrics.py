"""What a training step is measured by: tokens/s across ranks, peak memory, MFU, validation loss."""

from __future__ import annotations

import resource
from typing import Any

import torch
import torch.distributed as dist

from mydistill.config import TrainConfig
from mydistill.tokenization import TokenizedExample, collate
from mydistill.training.engines import world

PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("GH200", 989.0),
                    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0)]


def peak_tflops(cfg: TrainConfig, device: torch.device) -> float:
    """One device's peak TFLOP/s for MFU: ``train.peak_tflops``, else a known GPU's dense bf16
    peak, else 0 (no MFU: CPUs and unknown GPUs)."""
    if cfg.peak_tflops:
        return cfg.peak_tflops
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), 0.0)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # CPU: the process's peak resident set (ru_maxrss is in KiB on Linux)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def global_sum(value: float, device: torch.device) -> float:
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


@torch.no_grad()
def validation_loss(student: Any, examples: list[TokenizedExample], pad_token_id: int, device: torch.device) -> float:
    """Mean next-token cross-entropy over response tokens of ``examples``."""
    from mydistill.models import response_logits

    student.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), 64):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + 64], pad_token_id).items()}
        logits, labels = response_logits(student, batch)
        total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        count += labels.numel()
    student.train()
    return total / max(count, 1)


def progress_bar(enabled: bool, label: str, total: int, completed: int = 0):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    progress.start()
    return progress, progress.add_task(label, total=total, completed=completed)
