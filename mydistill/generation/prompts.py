"""The generate stage's input: the prompts dataset, read and checked whole, then formatted for the teacher.

Empty prompts and exact duplicates are skipped and counted; a record without a string ``prompt``
or two different records with the same explicit id raise :class:`DataError`. Prompts longer than
the teacher's prompt window are truncated, skipped or refused (``generate.overlong``) before
anything is generated.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from mydistill import io
from mydistill.config.generation import GenerateConfig
from mydistill.generation.base import PreparedPrompt, TeacherBackend
from mydistill.generation.rationale import apply_template
from mydistill.io import DataError

logger = logging.getLogger(__name__)


@dataclass
class PromptItem:
    id: str
    prompt: str
    fields: dict[str, Any] = field(default_factory=dict)  # the other input fields, carried through


@dataclass
class PromptSet:
    items: list[PromptItem]
    sha256: str
    counts: dict[str, int]


def derive_id(record: dict[str, Any]) -> str:
    """A stable id for a record without one: a hash of its content (all fields)."""
    return "p-" + io.sha256_of({k: v for k, v in record.items() if k != "id"})[:16]


def _iter_sources(uri: str) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(file, record number in that file, record) over a file or a folder of shards."""
    fs, path = io.filesystem(uri)
    if fs.exists(path) and fs.isdir(path):
        names = sorted(
            io.basename(p) for p in fs.ls(path, detail=False) if p.endswith((".jsonl", ".parquet")) and not io.basename(p).startswith(".")
        )
        files = [io.join(uri, name) for name in names]
    else:
        files = [uri]
    if not files:
        raise DataError(f"{uri}: folder holds no .jsonl or .parquet shards")
    for file in files:
        for number, record in enumerate(io.iter_records(file), start=1):
            yield file, number, record


def load_prompts(prompts_uri: str) -> PromptSet:
    """Read and check the prompts dataset (all of it, before anything is generated).

    Empty prompts and exact duplicates are skipped and counted; a record without a string
    ``prompt`` or two different records with the same explicit id raise :class:`DataError`.
    """
    items: list[PromptItem] = []
    seen: dict[str, tuple[str, str]] = {}  # id -> (where, content hash)
    counts = Counter(records=0, empty=0, duplicate=0)

    def take(file: str, number: int, record: dict[str, Any]) -> None:
        counts["records"] += 1
        where = f"{file}: record {number}"
        if "prompt" not in record:
            raise DataError(f"{where}: no 'prompt' field (fields: {sorted(record)[:10]})")
        prompt = record["prompt"]
        if prompt is not None and not isinstance(prompt, str):
            raise DataError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
        if prompt is None or not prompt.strip():
            counts["empty"] += 1
            return
        explicit = record.get("id") not in (None, "")
        rid = str(record["id"]) if explicit else derive_id(record)
        content = io.sha256_of(record)
        if rid in seen:
            first_where, first_content = seen[rid]
            if first_content != content:
                raise DataError(f"{where}: id {rid!r} already used by {first_where}; ids must be unique")
            counts["duplicate"] += 1
            return
        seen[rid] = (where, content)
        items.append(PromptItem(rid, prompt, {k: v for k, v in record.items() if k not in ("id", "prompt")}))

    def records() -> Iterator[dict[str, Any]]:
        # Checked while streaming into the content hash: only the kept items stay in memory.
        for file, number, record in _iter_sources(prompts_uri):
            take(file, number, record)
            yield record

    sha256 = io.records_sha256(records())
    counts["used"] = len(items)
    return PromptSet(items=items, sha256=sha256, counts=dict(counts))


def prepare_prompts(
    items: Sequence[PromptItem], backend: TeacherBackend, cfg: GenerateConfig
) -> tuple[list[tuple[PromptItem, PreparedPrompt]], dict[str, int]]:
    """Format and count every prompt; apply the overlong policy before anything is generated."""
    window = backend.context_window(cfg.max_new_tokens)
    if cfg.max_prompt_tokens is not None:
        window = cfg.max_prompt_tokens if window is None else min(window, cfg.max_prompt_tokens)
    if window is not None and window < 1:
        raise ValueError(
            f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the teacher's context window"
        )
    prepared: list[tuple[PromptItem, PreparedPrompt]] = []
    overlong: list[str] = []
    truncated = skipped = 0
    for item in items:
        message = apply_template(item.prompt, cfg.rationale_template) if cfg.rationale else item.prompt
        prompt = backend.prepare(item.id, message)
        if window is not None and prompt.num_tokens is not None and prompt.num_tokens > window:
            overlong.append(item.id)
            if cfg.overlong == "truncate":
                cut = backend.truncate(prompt, window)
                if cut is None:
                    logger.warning(
                        "prompt %s cannot be truncated to %d tokens (template too long); skipped", item.id, window
                    )
                    skipped += 1
                    continue
                prompt, truncated = cut, truncated + 1
            elif cfg.overlong == "skip":
                skipped += 1
                continue
        prepared.append((item, prompt))
    if overlong and cfg.overlong == "error":
        shown = ", ".join(repr(i) for i in overlong[:5]) + (" ..." if len(overlong) > 5 else "")
        raise DataError(
            f"{len(overlong)} prompt(s) are longer than the {window}-token prompt window ({shown}); "
            "set overlong to 'truncate' or 'skip', or raise max_prompt_tokens"
        )
    if overlong:
        logger.warning(
            "%d prompt(s) longer than %d tokens: %d truncated, %d skipped (overlong=%s)",
            len(overlong),
            window,
            truncated,
            skipped,
            cfg.overlong,
        )
    counts = {"overlong": len(overlong), "overlong_truncated": truncated, "overlong_skipped": skipped}
    return prepared, counts
