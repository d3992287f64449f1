"""The generate stage: prompts dataset -> teacher responses dataset (sharded, resumable).

Output folder layout::

    output_uri/
      generate_params.json   the settings the shards were made with (written before the first shard)
      part-00000.jsonl       shards of at most cfg.shard_size records, each committed atomically
      part-00001.jsonl
      manifest.json          written last: the artifact is complete

A run that dies leaves whole shards behind; the next run with the same settings reads which
(id, sample_index) pairs exist and generates only the rest, so every prompt ends up exactly once
per sample. A finished run whose manifest matches the inputs is skipped.

Across runs (a nightly run after new prompts arrived), responses are reused from a response cache
(``cache_uri``): one folder per teacher fingerprint and content settings, holding shards of
``{prompt_sha256, sample_index, completion}`` that each run adds to. Only prompts the cache does
not know go to the teacher; a reused record is rebuilt exactly as it was first written. Cache
shards are written atomically before the output shard holding the same responses, so a killed
run loses nothing it paid the teacher for.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from mydistill import io
from mydistill.generation.base import Completion, GenerationRequest, PreparedPrompt, Sampling, TeacherBackend
from mydistill.config.generation import GenerateConfig
from mydistill.generation.rationale import apply_template, parse_rationale
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


# ----------------------------------------------------------------------------------------------
# input


def derive_id(record: dict[str, Any]) -> str:
    """A stable id for a record without one: a hash of its content (all fields)."""
    return "p-" + io.sha256_of({k: v for k, v in record.items() if k != "id"})[:16]


def _iter_sources(uri: str) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(file, record number in that file, record) over a file or a folder of shards."""
    fs, path = io.filesystem(uri)
    if fs.exists(path) and fs.isdir(path):
        names = sorted(
            p.rstrip("/").rsplit("/", 1)[-1]
            for p in fs.ls(path, detail=False)
            if p.endswith((".jsonl", ".parquet")) and not p.rstrip("/").rsplit("/", 1)[-1].startswith(".")
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


# ----------------------------------------------------------------------------------------------
# backends


def make_backend(cfg: GenerateConfig, teacher: str, *, model: Any = None, tokenizer: Any = None) -> TeacherBackend:
    """The backend ``cfg.backend`` for ``teacher`` (heavy imports happen here, only for the one chosen)."""
    if cfg.backend == "hf":
        from mydistill.generation.hf import HFBackend

        return HFBackend(
            teacher, model=model, tokenizer=tokenizer, batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype
        )
    if cfg.backend == "vllm":
        if model is not None:
            raise ValueError("backend='vllm' loads the teacher itself; pass model= only with backend='hf'")
        from mydistill.generation.vllm import VLLMBackend

        return VLLMBackend(teacher, dtype=cfg.dtype, seed=cfg.seed, tokenizer=tokenizer)
    from mydistill.generation.openai_api import OpenAIBackend

    assert cfg.api_base is not None  # checked by GenerateConfig
    return OpenAIBackend(
        cfg.api_base,
        cfg.api_model or teacher,
        api_key_env=cfg.api_key_env,
        concurrency=cfg.concurrency,
        timeout_s=cfg.timeout_s,
        max_retries=cfg.max_retries,
        backoff_s=cfg.backoff_s,
        max_tokens_param=cfg.api_max_tokens_param,
        tokenizer=tokenizer,
    )


# ----------------------------------------------------------------------------------------------
# output folder


def shard_name(index: int) -> str:
    return f"part-{index:05d}.jsonl"


def list_shards(output_uri: str, pattern: re.Pattern[str] = SHARD_RE) -> list[str]:
    """Names of the committed shards in ``output_uri``, in order."""
    fs, path = io.filesystem(output_uri)
    if not fs.exists(path):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
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


def _check_output(output_uri: str, params: dict[str, Any], shards: list[str]) -> None:
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


def _cached_completion(entry: dict[str, Any]) -> Completion:
    c = entry["completion"]
    return Completion(c["text"], c["finish_reason"], c["prompt_tokens"], c["completion_tokens"])


# ----------------------------------------------------------------------------------------------
# the stage


def generate_responses(
    prompts_uri: str,
    output_uri: str,
    *,
    teacher: str,
    teacher_id: str | None = None,
    cfg: GenerateConfig,
    progress: bool = True,
    model: Any = None,
    tokenizer: Any = None,
    backend: TeacherBackend | None = None,
    cache_uri: str | None = None,
    teacher_fingerprint: str | None = None,
    lineage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate teacher responses for every prompt in ``prompts_uri`` into ``output_uri``; returns the manifest.

    ``teacher`` is a local or ``s3://`` model folder (hf, vllm) or the API's model name (openai);
    ``teacher_id`` names it in records and manifests (default: ``teacher``, or ``api_model`` for
    openai). ``model`` / ``tokenizer`` are already-loaded objects to use instead of loading them
    (hf; a tokenizer also lets the openai backend count and truncate prompts). ``backend`` is an
    already-built :class:`TeacherBackend` that replaces the one ``cfg.backend`` names.

    ``cache_uri`` keeps responses across runs (see the module docstring) for a teacher known by
    ``teacher_fingerprint`` (default: :func:`mydistill.fingerprint.fingerprint` of ``teacher``);
    ``lineage`` (teacher, tokenizer, chat template) is recorded in the manifest as it is given.

    Resumes a partial output made with the same settings; skips a finished one. Raises
    :class:`DataError` for a malformed prompts file (before writing anything), when no prompt
    remains, or when ``output_uri`` holds responses made with other settings.
    """
    if teacher_id is None:
        teacher_id = (cfg.api_model or teacher) if cfg.backend == "openai" else teacher
    prompts = load_prompts(prompts_uri)
    if not prompts.items:
        raise DataError(
            f"{prompts_uri}: no prompts to generate from ({prompts.counts['records']} records, "
            f"{prompts.counts['empty']} empty, {prompts.counts['duplicate']} duplicates)"
        )
    if cache_uri is not None and teacher_fingerprint is None:
        from mydistill.fingerprint import fingerprint

        teacher_fingerprint = fingerprint(teacher, kind="model" if io.exists(teacher) else "name")["sha256"]
    params = {
        "teacher_id": teacher_id, **cfg.content_params(),
        # a teacher changed in place at the same URI must not add to shards of the one before
        **({"teacher_fingerprint": teacher_fingerprint} if teacher_fingerprint else {}),
    }
    inputs = {"prompts_sha256": prompts.sha256, "generation": params}
    cache = ResponseCache(cache_uri, teacher_fingerprint=teacher_fingerprint, params=cfg.content_params()) if cache_uri and teacher_fingerprint else None

    shards = list_shards(output_uri)
    manifest = io.read_manifest(output_uri)
    complete = manifest is not None and set(manifest.get("shards", [])) <= set(shards)
    if complete and io.manifest_matches(output_uri, inputs):
        logger.info("generate: %s is complete for these inputs; skipped", output_uri)
        return manifest  # type: ignore[return-value]
    _check_output(output_uri, params, shards)
    if manifest is not None:
        # A manifest says "complete": it must not stand beside a folder that is being changed.
        io.remove(io.join(output_uri, io.MANIFEST_NAME))

    done = {(str(r["id"]), int(r["sample_index"])) for r in iter_responses(output_uri)}
    known = {item.id for item in prompts.items}
    stale = sorted({i for i, _ in done} - known)
    if stale:
        raise DataError(
            f"{output_uri} holds responses for {len(stale)} prompt(s) that are not in {prompts_uri} "
            f"(e.g. id {stale[0]!r}); use another output_uri for a different prompt set"
        )

    owns_backend = backend is None
    if backend is None:
        backend = make_backend(cfg, teacher, model=model, tokenizer=tokenizer)
    try:
        prepared, prompt_counts = _prepare(prompts.items, backend, cfg)
        if not prepared:
            raise DataError(
                f"{prompts_uri}: no prompts left: all {len(prompts.items)} are longer than the prompt window"
            )
        pending = [
            (item, prompt, tuple(s for s in range(cfg.num_samples) if (item.id, s) not in done))
            for item, prompt in prepared
        ]
        pending = [p for p in pending if p[2]]
        if pending and not shards:
            # Recorded before the first shard, so a later run can tell whether it may add to them.
            io.write_json(io.join(output_uri, PARAMS_NAME), {"generation": params})
        reused = 0
        if cache is not None and pending:
            pending, reused = _write_reused(pending, cache.load(), cfg, output_uri, shards, teacher_id=teacher_id)
            shards = list_shards(output_uri)
        run = _generate_shards(pending, backend, cfg, output_uri, shards, teacher_id=teacher_id, progress=progress, cache=cache)
        run["resumed_records"] = len(done)
        run["reused_records"] = reused
    except BaseException:
        if not list_shards(output_uri):
            # nothing was generated: leave no folder that looks like a started artifact
            io.remove(output_uri)
        raise
    finally:
        if owns_backend:
            backend.close()

    summary = summarize_output(output_uri)
    prompt_counts = {**prompts.counts, **prompt_counts}
    # One flat dict of numbers, convenient to log as metrics.
    counts = {
        "records": summary["records"],
        **summary["status_counts"],
        **{f"prompts_{k}": v for k, v in prompt_counts.items()},
        "prompt_tokens": summary["tokens"]["prompt"],
        "completion_tokens": summary["tokens"]["completion"],
        # this run: asked of the teacher, taken from the response cache, found from an interrupted run
        "generated": run["generated_records"],
        "reused": run["reused_records"],
        "resumed": run["resumed_records"],
    }
    manifest = io.write_manifest(
        output_uri,
        stage="generate",
        inputs=inputs,
        prompts_uri=prompts_uri,
        teacher_id=teacher_id,
        backend=backend.name,
        sampling=_sampling_dict(cfg),
        shards=list_shards(output_uri),
        prompts=prompt_counts,
        counts=counts,
        **summary,
        config=cfg.public_dict(),
        run=run,
        **({"response_cache": cache.uri} if cache else {}),
        **({"lineage": lineage} if lineage else {}),
    )
    logger.info(
        "generate: %d records in %s (%s); this run generated %d at %.1f tokens/s and reused %d from earlier runs",
        summary["records"],
        output_uri,
        ", ".join(f"{k}={v}" for k, v in manifest["status_counts"].items() if v),
        run["generated_records"],
        run["tokens_per_s"],
        run["reused_records"],
    )
    return manifest


def _write_reused(
    pending: list[tuple[PromptItem, PreparedPrompt, tuple[int, ...]]],
    cached: dict[tuple[str, int], dict[str, Any]],
    cfg: GenerateConfig,
    output_uri: str,
    shards: list[str],
    *,
    teacher_id: str,
) -> tuple[list[tuple[PromptItem, PreparedPrompt, tuple[int, ...]]], int]:
    """Write the responses the cache holds as output shards; returns what is left to generate and
    how many records were reused."""
    left: list[tuple[PromptItem, PreparedPrompt, tuple[int, ...]]] = []
    records: list[dict[str, Any]] = []
    for item, prompt, samples in pending:
        key = prompt_sha256(item.prompt)
        missing = tuple(s for s in samples if (key, s) not in cached)
        if missing:
            left.append((item, prompt, missing))
        records += [
            build_record(item, prompt, s, _cached_completion(cached[(key, s)]), teacher_id=teacher_id, sampling=_sampling_dict(cfg), cfg=cfg)
            for s in samples if (key, s) in cached
        ]
    next_index = max((int(SHARD_RE.match(n).group(1)) for n in shards), default=-1) + 1  # type: ignore[union-attr]
    for begin in range(0, len(records), cfg.shard_size):
        io.write_records(io.join(output_uri, shard_name(next_index)), records[begin : begin + cfg.shard_size])
        next_index += 1
    if records:
        logger.info("generate: %d response(s) reused from earlier runs, %d prompt(s) left for the teacher", len(records), len(left))
    return left, len(records)


def _sampling_dict(cfg: GenerateConfig) -> dict[str, Any]:
    return {
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "num_samples": cfg.num_samples,
        "seed": cfg.seed,
    }


def _prepare(
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


def _generate_shards(
    pending: list[tuple[PromptItem, PreparedPrompt, tuple[int, ...]]],
    backend: TeacherBackend,
    cfg: GenerateConfig,
    output_uri: str,
    shards: list[str],
    *,
    teacher_id: str,
    progress: bool,
    cache: ResponseCache | None = None,
) -> dict[str, Any]:
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed)
    sampling_record = _sampling_dict(cfg)
    next_index = max((int(SHARD_RE.match(n).group(1)) for n in shards), default=-1) + 1  # type: ignore[union-attr]

    # Shards hold whole prompts (all their missing samples), so a crash never splits a prompt.
    chunks: list[list[tuple[PromptItem, PreparedPrompt, tuple[int, ...]]]] = []
    size = 0
    for entry in pending:
        if chunks and size + len(entry[2]) <= cfg.shard_size:
            chunks[-1].append(entry)
            size += len(entry[2])
        else:
            chunks.append([entry])
            size = len(entry[2])

    total = sum(len(e[2]) for e in pending)
    generated = tokens = 0
    started = time.perf_counter()
    if total:
        logger.info("generate: %d responses to make in %d shard(s) with %s", total, len(chunks), backend.name)
    with _progress_bar(progress, total) as advance:
        for chunk in chunks:
            requests = [GenerationRequest(prompt, samples) for _, prompt, samples in chunk]
            results = backend.generate(requests, sampling, advance)
            records = []
            for (item, prompt, samples), completions in zip(chunk, results, strict=True):
                if len(completions) != len(samples):
                    raise RuntimeError(
                        f"{backend.name} returned {len(completions)} completions for {len(samples)} samples"
                    )
                for sample_index, completion in zip(samples, completions, strict=True):
                    records.append(
                        build_record(
                            item,
                            prompt,
                            sample_index,
                            completion,
                            teacher_id=teacher_id,
                            sampling=sampling_record,
                            cfg=cfg,
                        )
                    )
            if cache is not None:
                cache.add(records)  # first: a run killed before the output shard still keeps these
            name = shard_name(next_index)
            io.write_records(io.join(output_uri, name), records)
            next_index += 1
            generated += len(records)
            tokens += sum(r["completion_tokens"] or 0 for r in records)
            logger.info("generate: wrote %s (%d records, %d/%d)", name, len(records), generated, total)
    seconds = time.perf_counter() - started
    return {
        "generated_records": generated,
        "completion_tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 and tokens else 0.0,
    }


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Any]:
    if total == 0:
        yield None
        return
    if not enabled:  # no terminal (a worker's log): periodic lines instead of a bar
        from mydistill.progress import ProgressLog

        yield ProgressLog("generate", total, logger)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("generate"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ) as bar:
        task = bar.add_task("generate", total=total)
        yield lambda n: bar.advance(task, n)
