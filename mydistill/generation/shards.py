"""The generate stage's output folder: shard names, the records they hold, resume checks, and the
response cache kept across runs (see :mod:`mydistill.generation.stage` for the layout).

Output shards are ``part-NNNNN.jsonl``, each committed atomically; the settings they were made
with are in ``generate_params.json``, written before the first. Cache shards are
``responses-<time>-<random>.jsonl`` under ``<cache_uri>/<key>``, one per write.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from mydistill import io
from mydistill.config.generation import GenerateConfig
from mydistill.generation.base import Completion, PreparedPrompt
from mydistill.generation.prompts import PromptItem
from mydistill.generation.rationale import parse_rationale
from mydistill.io import DataError

logger = logging.getLogger(__name__)

PARAMS_NAME = "generate_params.json"
SHARD_RE = re.compile(r"^part-(\d{5,})\.jsonl$")
CACHE_SHARD_RE = re.compile(r"^responses-\d{20}-[0-9a-f]{6}\.jsonl$")
STATUSES = ("ok", "empty", "truncated", "failed", "unparsed")
FINISH_REASONS = ("stop", "length", "error")
# Fields the stage writes; an input field with one of these names is kept as input_<name>.
RECORD_FIELDS = (
    "id",
    "prompt",
    "response",
    "teacher_id",
    "sample_index",
    "sampling",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "status",
    "error",
)
RATIONALE_FIELDS = ("rationale", "answer")

class Pending(NamedTuple):
    """A prompt, formatted for the teacher, with the sample indices still to make."""

    item: PromptItem
    prompt: PreparedPrompt
    samples: tuple[int, ...]


# ----------------------------------------------------------------------------------------------
# output folder


def shard_name(index: int) -> str:
    return f"part-{index:05d}.jsonl"


def list_shards(output_uri: str, pattern: re.Pattern[str] = SHARD_RE) -> list[str]:
    """Names of the committed shards in ``output_uri``, in order."""
    fs, path = io.filesystem(output_uri)
    if not fs.exists(path):
        return []
    names = [io.basename(p) for p in fs.ls(path, detail=False)]
    return sorted(n for n in names if pattern.match(n))


def iter_responses(output_uri: str) -> Iterator[dict[str, Any]]:
    """The records of a (possibly partial) generate output, shard by shard."""
    for name in list_shards(output_uri):
        yield from io.iter_records(io.join(output_uri, name))


def read_responses(output_uri: str) -> list[dict[str, Any]]:
    return list(iter_responses(output_uri))


def summarize_output(output_uri: str) -> dict[str, Any]:
    """Counts, token totals and content hash of everything in ``output_uri`` (one streaming pass).

    Raises :class:`DataError` if a (id, sample_index) pair appears twice.
    """
    statuses: Counter[str] = Counter()
    finishes: Counter[str] = Counter()
    tokens = {"prompt": 0, "completion": 0}
    keys: set[tuple[str, int]] = set()

    def records() -> Iterator[dict[str, Any]]:
        for record in iter_responses(output_uri):
            key = (str(record["id"]), int(record["sample_index"]))
            if key in keys:
                raise DataError(f"{output_uri}: response {key} appears twice; was the folder changed by hand?")
            keys.add(key)
            statuses[record["status"]] += 1
            finishes[record["finish_reason"]] += 1
            tokens["prompt"] += record.get("prompt_tokens") or 0
            tokens["completion"] += record.get("completion_tokens") or 0
            yield record

    sha256 = io.records_sha256(records())
    return {
        "records": len(keys),
        "status_counts": {k: statuses.get(k, 0) for k in STATUSES},
        "finish_reason_counts": {k: finishes.get(k, 0) for k in FINISH_REASONS},
        "tokens": tokens,
        "records_sha256": sha256,
    }


def next_shard_index(shards: list[str]) -> int:
    """The number the next output shard gets, after the committed ``shards``."""
    return max((int(SHARD_RE.match(n).group(1)) for n in shards), default=-1) + 1  # type: ignore[union-attr]


def check_output(output_uri: str, params: dict[str, Any], shards: list[str]) -> None:
    """Refuse to add to shards that were made with other settings than ``params``."""
    if not shards:
        return
    params_uri = io.join(output_uri, PARAMS_NAME)
    if not io.exists(params_uri):
        raise DataError(f"{output_uri} holds shards but no {PARAMS_NAME}; use another output_uri or delete it")
    existing = io.read_json(params_uri).get("generation") or {}
    if existing != params:
        changed = sorted(k for k in set(existing) | set(params) if existing.get(k) != params.get(k))
        raise DataError(
            f"{output_uri} holds responses generated with other settings (differs in: {', '.join(changed)}). "
            "Use another output_uri, or delete this one to start over."
        )


# ----------------------------------------------------------------------------------------------
# records


def record_status(completion: Completion, *, rationale_ok: bool | None) -> str:
    """failed > empty > truncated > unparsed > ok (the mix stage keeps 'ok' only)."""
    if completion.finish_reason == "error":
        return "failed"
    if not completion.text.strip():
        return "empty"
    if completion.finish_reason == "length":
        return "truncated"
    if rationale_ok is False:
        return "unparsed"
    return "ok"


def build_record(
    item: PromptItem,
    prompt: PreparedPrompt,
    sample_index: int,
    completion: Completion,
    *,
    teacher_id: str,
    sampling: dict[str, Any],
    cfg: GenerateConfig,
) -> dict[str, Any]:
    ours: dict[str, Any] = {
        "id": item.id,
        "prompt": item.prompt,
        "response": completion.text,
        "teacher_id": teacher_id,
        "sample_index": sample_index,
        "sampling": dict(sampling),
        "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.prompt_tokens if completion.prompt_tokens is not None else prompt.num_tokens,
        "completion_tokens": completion.completion_tokens,
        "error": completion.error,
    }
    rationale_ok = None
    if cfg.rationale:
        parsed = parse_rationale(completion.text, cfg.rationale_pattern)
        ours["rationale"], ours["answer"] = parsed.rationale, parsed.answer
        rationale_ok = parsed.ok
    ours["status"] = record_status(completion, rationale_ok=rationale_ok)
    record = dict(item.fields)
    for name in ours:
        # Carry input fields through, but never let ours overwrite them silently: e.g. a gold
        # 'answer' in the prompts becomes 'input_answer' when the teacher's answer takes its place.
        if name in record:
            record.setdefault(f"input_{name}", record[name])
            del record[name]
    record.update(ours)
    return record


def sampling_dict(cfg: GenerateConfig) -> dict[str, Any]:
    """The sampling settings as every record and the manifest name them."""
    return {
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "num_samples": cfg.num_samples,
        "seed": cfg.seed,
    }


# ----------------------------------------------------------------------------------------------
# responses kept across runs


def prompt_sha256(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


class ResponseCache:
    """Teacher completions kept across runs under ``<root>/<key>``, ``key`` naming the teacher's
    fingerprint and the content settings (what decides the text); entries are keyed by
    (sha256 of the prompt, sample index)."""

    def __init__(self, root: str, *, teacher_fingerprint: str, params: dict[str, Any]):
        self.key = io.sha256_of({"teacher": teacher_fingerprint, "generation": params})[:16]
        self.uri = io.join(root, self.key)

    def load(self) -> dict[tuple[str, int], dict[str, Any]]:
        entries: dict[tuple[str, int], dict[str, Any]] = {}
        for name in list_shards(self.uri, CACHE_SHARD_RE):
            for entry in io.iter_records(io.join(self.uri, name)):
                entries.setdefault((entry["prompt_sha256"], int(entry["sample_index"])), entry)
        return entries

    def add(self, records: Sequence[dict[str, Any]]) -> None:
        """Keep the good completions of ``records`` (failed ones are asked again next time)."""
        entries = [
            {
                "prompt_sha256": prompt_sha256(r["prompt"]),
                "sample_index": r["sample_index"],
                "completion": {
                    "text": r["response"], "finish_reason": r["finish_reason"],
                    "prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                },
            }
            for r in records
            if r["finish_reason"] != "error"
        ]
        if entries:
            # a new name per write: concurrent runs never overwrite each other's shards
            io.write_records(io.join(self.uri, f"responses-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.jsonl"), entries)


def cached_completion(entry: dict[str, Any]) -> Completion:
    c = entry["completion"]
    return Completion(c["text"], c["finish_reason"], c["prompt_tokens"], c["completion_tokens"])


def write_reused(
    pending: list[Pending],
    cached: dict[tuple[str, int], dict[str, Any]],
    cfg: GenerateConfig,
    output_uri: str,
    shards: list[str],
    *,
    teacher_id: str,
) -> tuple[list[Pending], int]:
    """Write the responses the cache holds as output shards; returns what is left to generate and
    how many records were reused."""
    left: list[Pending] = []
    records: list[dict[str, Any]] = []
    for item, prompt, samples in pending:
        key = prompt_sha256(item.prompt)
        missing = tuple(s for s in samples if (key, s) not in cached)
        if missing:
            left.append(Pending(item, prompt, missing))
        records += [
            build_record(item, prompt, s, cached_completion(cached[(key, s)]), teacher_id=teacher_id, sampling=sampling_dict(cfg), cfg=cfg)
            for s in samples if (key, s) in cached
        ]
    next_index = next_shard_index(shards)
    for begin in range(0, len(records), cfg.shard_size):
        io.write_records(io.join(output_uri, shard_name(next_index)), records[begin : begin + cfg.shard_size])
        next_index += 1
    if records:
        logger.info("generate: %d response(s) reused from earlier runs, %d prompt(s) left for the teacher", len(records), len(left))
    return left, len(records)
