"""The mix stage: teacher responses + real labelled data → train / val / task-train datasets.

Training records have the shape ``{"id", "prompt", "response", "source"}`` with source
``"teacher"`` or ``"real"``; teacher records from the generate stage's rationale mode also keep
their ``rationale`` and ``answer`` (for distilling step-by-step).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mydistill.config.pipeline import MixConfig
from mydistill.io import DataError, join, manifest_matches, read_records, records_sha256, text_field, write_manifest, write_records

TRAIN_FILE = "train.jsonl"
VAL_FILE = "val.jsonl"
TASK_TRAIN_FILE = "task_train.jsonl"


@dataclass
class MixResult:
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    task_train: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)


def _usable_teacher(records: Sequence[dict[str, Any]], source_uri: str, counts: Counter) -> list[dict[str, Any]]:
    out = []
    for r in records:
        status = r.get("status", "ok")
        response = r.get("response")
        if "prompt" not in r:
            raise DataError(f"{source_uri}: teacher record {r.get('id', '?')!r} has no 'prompt' field")
        if status != "ok":
            counts[f"dropped_teacher_{status}"] += 1
        elif not isinstance(response, str) or not response.strip():
            counts["dropped_teacher_empty"] += 1
        else:
            # text, as the real prompts are: the records are ordered by prompt below
            prompt = text_field(r, "prompt", f"{source_uri}: teacher record {r.get('id', '?')!r}")
            record = {"id": str(r.get("id", "")), "prompt": prompt, "response": response, "source": "teacher"}
            if has_rationale(r):
                # rationale mode: kept for distilling step-by-step (distill.loss.step_by_step)
                record.update(rationale=r["rationale"], answer=str(r.get("answer") or ""))
            out.append(record)
    return out


def has_rationale(record: dict[str, Any]) -> bool:
    """Whether a record carries a non-empty teacher rationale (the generate stage's rationale mode)."""
    rationale = record.get("rationale")
    return isinstance(rationale, str) and bool(rationale.strip())


def _real_records(
    records: Sequence[dict[str, Any]], source_uri: str, prompt_field: str, answer_field: str
) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(records):
        where = f"{source_uri}: record {i + 1}"
        prompt = text_field(r, prompt_field, where)
        answer = text_field(r, answer_field, where, numbers=True)  # a null answer must not become "None"
        out.append({"id": str(r.get("id", i)), "prompt": prompt, "response": answer, "source": "real"})
    return out


def _dedup(records: list[dict[str, Any]], banned: set[str], counts: Counter, label: str) -> list[dict[str, Any]]:
    seen = set(banned)
    out = []
    for r in records:
        if r["prompt"] in seen:
            counts[f"dropped_{label}_duplicate"] += 1
            continue
        seen.add(r["prompt"])
        out.append(r)
    return out


def _draw(rng: random.Random, pool: list[dict[str, Any]], n: int, with_replacement: bool) -> list[dict[str, Any]]:
    if n <= len(pool):
        return rng.sample(pool, n)
    if not with_replacement:
        raise AssertionError("caller sized the draw beyond the pool")
    # every record once, then the remainder sampled: keeps the draw as even as possible
    return pool + [rng.choice(pool) for _ in range(n - len(pool))]


def mix_datasets(
    teacher: Sequence[dict[str, Any]],
    real: Sequence[dict[str, Any]],
    *,
    teacher_fraction: float = 0.7,
    val_fraction: float = 0.1,
    total: int | None = None,
    upsample: bool = True,
    dedup: bool = True,
    seed: int = 0,
    teacher_uri: str = "teacher data",
    real_uri: str = "real data",
    prompt_field: str = "prompt",
    answer_field: str = "answer",
) -> MixResult:
    """Mix teacher responses with real labelled records at ``teacher_fraction``.

    Failed, empty and truncated teacher generations are dropped; with ``dedup`` duplicate prompts
    are dropped and a teacher record whose prompt is also in the real data gives way to the real
    one (its label is ground truth, and validation stays free of teacher copies). The real data is
    split first, so validation and task-train never overlap. The mix size defaults to every usable
    teacher record once; the scarcer source is upsampled with replacement (``upsample``) or the mix
    shrinks to fit. The realised ratio is returned in ``stats``.
    """
    if not 0 <= teacher_fraction <= 1:
        raise ValueError(f"teacher_fraction must be in [0, 1], got {teacher_fraction}")
    rng = random.Random(seed)
    counts: Counter = Counter()
    real_all = _real_records(real, real_uri, prompt_field, answer_field)
    # The generate stage's file order is not its content: responses reused from the cache are written
    # before the ones generated in the run, so the same records can arrive in another order. Put them
    # in one order first, or the same inputs give another shuffle and another training order.
    teacher_ok = sorted(_usable_teacher(teacher, teacher_uri, counts), key=lambda r: (r["prompt"], r["id"], r["response"]))
    if dedup:
        real_all = _dedup(real_all, set(), counts, "real")
        teacher_ok = _dedup(teacher_ok, {r["prompt"] for r in real_all}, counts, "teacher")

    rng.shuffle(real_all)
    n_val = int(round(len(real_all) * val_fraction))
    val, task_train = real_all[:n_val], real_all[n_val:]

    if teacher_fraction > 0 and not teacher_ok:
        raise DataError(
            f"{teacher_uri}: no usable teacher responses after filtering ({dict(counts)}); "
            "check the generate stage's output or set mix.teacher_fraction=0"
        )
    if teacher_fraction < 1 and not task_train:
        raise DataError(f"{real_uri}: no real training records left after the validation split and filtering")

    if total is None:
        total = round(len(teacher_ok) / teacher_fraction) if teacher_fraction > 0 else len(task_train)
    n_teacher = round(total * teacher_fraction)
    n_real = total - n_teacher
    if not upsample:
        # shrink the whole mix until both sources fit without repeats, keeping the ratio
        scale = min(
            1.0,
            len(teacher_ok) / n_teacher if n_teacher else 1.0,
            len(task_train) / n_real if n_real else 1.0,
        )
        n_teacher, n_real = int(n_teacher * scale), int(n_real * scale)
    train = _draw(rng, teacher_ok, n_teacher, upsample) + _draw(rng, task_train, n_real, upsample)
    rng.shuffle(train)
    if not train:
        raise DataError("the training mix is empty after filtering")

    realised = sum(r["source"] == "teacher" for r in train) / len(train)
    stats = {
        "teacher_fraction_requested": teacher_fraction,
        "teacher_fraction_realised": realised,
        "train": len(train),
        "train_teacher": n_teacher,
        "train_real": n_real,
        "unique_teacher": len(teacher_ok),
        "unique_real_train": len(task_train),
        "val": len(val),
        "task_train": len(task_train),
        **dict(sorted(counts.items())),
    }
    return MixResult(train=train, val=val, task_train=task_train, stats=stats)


def run_mix(
    teacher_uri: str,
    real_uri: str,
    output_uri: str,
    cfg: MixConfig | None = None,
    *,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
) -> dict[str, Any]:
    """The mix stage: read both datasets, mix them as ``cfg`` says (the config's ``mix`` section;
    default 70% teacher), write ``train/val/task_train.jsonl`` + manifest.

    Skipped (the existing manifest returned) when ``output_uri`` already holds a mix of exactly
    these inputs.
    """
    teacher = read_records(teacher_uri)
    real = read_records(real_uri)
    params = {**(cfg or MixConfig()).model_dump(), "prompt_field": prompt_field, "answer_field": answer_field}
    inputs = {"teacher_sha256": records_sha256(teacher), "real_sha256": records_sha256(real), **params}
    if any(has_rationale(r) for r in teacher):
        inputs["keeps_rationales"] = True  # a mix written before rationales were kept is made again
    done = manifest_matches(output_uri, inputs)
    if done:
        return done
    result = mix_datasets(teacher, real, teacher_uri=teacher_uri, real_uri=real_uri, **params)
    files = {}
    for name, rows in ((TRAIN_FILE, result.train), (VAL_FILE, result.val), (TASK_TRAIN_FILE, result.task_train)):
        write_records(join(output_uri, name), rows)
        files[name] = {"count": len(rows), "sha256": records_sha256(rows)}
    return write_manifest(output_uri, stage="mix", inputs=inputs, files=files, stats=result.stats)
