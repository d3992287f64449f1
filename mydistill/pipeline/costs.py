"""What a run cost: wall time, device time, tokens, and (with a price table) money, per stage and per run.

Every published comparison of distillation recipes is in GPU-hours, tokens and dollars; these
numbers make ours comparable. Each stage measures itself (:func:`stage_cost`) and logs ``cost/*``
metrics on its MLflow run; the pipeline run sums its stages (:func:`total_cost`) and prices the
sum with ``costs:`` from the config (:func:`priced`). A stage answered from its artifacts costs
nothing in the run that reused it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

PREFIX = "cost/"


def stage_cost(
    *, wall_s: float, processes: int = 1, gpu: bool = False, teacher_prompt_tokens: float = 0,
    teacher_completion_tokens: float = 0, teacher_api: bool = False, train_tokens: float = 0, eval_examples: float = 0,
) -> dict[str, float]:
    """One stage's ``cost/*`` metrics. Device time is wall time × processes, on GPUs or CPUs;
    teacher tokens served by an API are counted apart (they are paid per token, not per hour)."""
    device_s = wall_s * processes
    api = "api_" if teacher_api else ""
    return {
        f"{PREFIX}wall_s": wall_s,
        f"{PREFIX}gpu_s": device_s if gpu else 0.0,
        f"{PREFIX}cpu_process_s": 0.0 if gpu else device_s,
        f"{PREFIX}teacher_{api}prompt_tokens": float(teacher_prompt_tokens),
        f"{PREFIX}teacher_{api}completion_tokens": float(teacher_completion_tokens),
        f"{PREFIX}train_tokens": float(train_tokens),
        f"{PREFIX}eval_examples": float(eval_examples),
    }


def total_cost(stages: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The sum of the stages' ``cost/*`` metrics."""
    total: dict[str, float] = {}
    for metrics in stages:
        for key, value in metrics.items():
            if key.startswith(PREFIX):
                total[key] = total.get(key, 0.0) + float(value)
    return total


def priced(total: Mapping[str, float], prices: Any, teacher_retained: float | None = None) -> dict[str, float]:
    """``total`` with GPU-hours, money (where ``prices`` — the ``costs:`` section — says what a unit
    costs) and the teacher's score kept per GPU-hour added."""
    out = dict(total)
    gpu_hours = total.get(f"{PREFIX}gpu_s", 0.0) / 3600
    cpu_hours = total.get(f"{PREFIX}cpu_process_s", 0.0) / 3600
    out[f"{PREFIX}gpu_hours"] = gpu_hours
    money = 0.0
    priced_anything = False
    for amount, price in (
        (gpu_hours, getattr(prices, "gpu_hour", None)),
        (cpu_hours, getattr(prices, "cpu_hour", None)),
        (total.get(f"{PREFIX}teacher_api_prompt_tokens", 0.0) / 1000, getattr(prices, "api_prompt_per_1k_tokens", None)),
        (total.get(f"{PREFIX}teacher_api_completion_tokens", 0.0) / 1000, getattr(prices, "api_completion_per_1k_tokens", None)),
    ):
        if price is not None:
            money += amount * price
            priced_anything = True
    if priced_anything:
        out[f"{PREFIX}money"] = money
    if teacher_retained is not None and gpu_hours > 0:
        out["teacher_retained_per_gpu_hour"] = teacher_retained / gpu_hours
    return out


def cost_lines(total: Mapping[str, float], currency: str = "USD") -> list[str]:
    """Short human lines for the CLI summary and the Prefect artifact."""
    lines = [
        f"wall {total.get(PREFIX + 'wall_s', 0):.0f} s; GPU {total.get(PREFIX + 'gpu_s', 0) / 3600:.3f} h; "
        f"CPU processes {total.get(PREFIX + 'cpu_process_s', 0) / 3600:.3f} h",
        f"tokens: teacher {total.get(PREFIX + 'teacher_prompt_tokens', 0) + total.get(PREFIX + 'teacher_api_prompt_tokens', 0):,.0f} "
        f"prompt + {total.get(PREFIX + 'teacher_completion_tokens', 0) + total.get(PREFIX + 'teacher_api_completion_tokens', 0):,.0f} "
        f"completion; training {total.get(PREFIX + 'train_tokens', 0):,.0f}",
    ]
    if PREFIX + "money" in total:
        lines.append(f"cost: {total[PREFIX + 'money']:.2f} {currency}")
    if "teacher_retained_per_gpu_hour" in total:
        lines.append(f"teacher retained per GPU-hour: {total['teacher_retained_per_gpu_hour']:.2f}")
    return lines
