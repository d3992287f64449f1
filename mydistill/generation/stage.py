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
import logging
import time
from collections.abc import Iterator
from typing import Any

from mydistill import io
from mydistill.config.generation import GenerateConfig
from mydistill.generation.base import GenerationRequest, PreparedPrompt, Sampling, TeacherBackend
from mydistill.generation.prompts import PromptItem, PromptSet, load_prompts, prepare_prompts
from mydistill.generation.shards import (
    PARAMS_NAME,
    Pending,
    ResponseCache,
    build_record,
    check_output,
    iter_responses,
    list_shards,
    next_shard_index,
    sampling_dict,
    shard_name,
    summarize_output,
    write_reused,
)
from mydistill.io import DataError

logger = logging.getLogger(__name__)


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
    finished = _finished_output(output_uri, inputs, params, shards)
    if finished is not None:
        return finished
    done = _resumed_responses(output_uri, prompts, prompts_uri)

    with _backend_for(cfg, teacher, backend, model=model, tokenizer=tokenizer) as backend, _no_folder_if_nothing_written(output_uri):
        prepared, prompt_counts = prepare_prompts(prompts.items, backend, cfg)
        if not prepared:
            raise DataError(
                f"{prompts_uri}: no prompts left: all {len(prompts.items)} are longer than the prompt window"
            )
        run = _generate_missing(
            prepared, done, backend, cfg, output_uri, shards, params=params, cache=cache, teacher_id=teacher_id, progress=progress,
        )
    return _write_manifest(
        output_uri, inputs=inputs, prompts_uri=prompts_uri, teacher_id=teacher_id, backend=backend, cfg=cfg,
        prompt_counts={**prompts.counts, **prompt_counts}, run=run, cache=cache, lineage=lineage,
    )


def _finished_output(output_uri: str, inputs: dict[str, Any], params: dict[str, Any], shards: list[str]) -> dict[str, Any] | None:
    """The manifest of a complete output made from ``inputs`` (the stage is skipped); else None, once
    the folder is fit to add to: its shards made with ``params``, no manifest left beside them."""
    manifest = io.read_manifest(output_uri)
    complete = manifest is not None and set(manifest.get("shards", [])) <= set(shards)
    if complete and io.manifest_matches(output_uri, inputs):
        logger.info("generate: %s is complete for these inputs; skipped", output_uri)
        return manifest
    check_output(output_uri, params, shards)
    if manifest is not None:
        # A manifest says "complete": it must not stand beside a folder that is being changed.
        io.remove(io.join(output_uri, io.MANIFEST_NAME))
    return None


def _resumed_responses(output_uri: str, prompts: PromptSet, prompts_uri: str) -> set[tuple[str, int]]:
    """The (id, sample_index) pairs an interrupted run already wrote; refuses responses to prompts
    that are not in ``prompts``."""
    done = {(str(r["id"]), int(r["sample_index"])) for r in iter_responses(output_uri)}
    known = {item.id for item in prompts.items}
    stale = sorted({i for i, _ in done} - known)
    if stale:
        raise DataError(
            f"{output_uri} holds responses for {len(stale)} prompt(s) that are not in {prompts_uri} "
            f"(e.g. id {stale[0]!r}); use another output_uri for a different prompt set"
        )
    return done


@contextlib.contextmanager
def _backend_for(
    cfg: GenerateConfig, teacher: str, backend: TeacherBackend | None, *, model: Any, tokenizer: Any
) -> Iterator[TeacherBackend]:
    """``backend`` as given (the caller closes it), or the one ``cfg.backend`` names, closed after use."""
    if backend is not None:
        yield backend
        return
    backend = make_backend(cfg, teacher, model=model, tokenizer=tokenizer)
    try:
        yield backend
    finally:
        backend.close()


@contextlib.contextmanager
def _no_folder_if_nothing_written(output_uri: str) -> Iterator[None]:
    try:
        yield
    except BaseException:
        if not list_shards(output_uri):
            # nothing was generated: leave no folder that looks like a started artifact
            io.remove(output_uri)
        raise


def _generate_missing(
    prepared: list[tuple[PromptItem, PreparedPrompt]],
    done: set[tuple[str, int]],
    backend: TeacherBackend,
    cfg: GenerateConfig,
    output_uri: str,
    shards: list[str],
    *,
    params: dict[str, Any],
    cache: ResponseCache | None,
    teacher_id: str,
    progress: bool,
) -> dict[str, Any]:
    """Write the responses not ``done`` yet: from the response cache where it holds them, the rest
    from the teacher; returns this run's numbers."""
    pending = [
        Pending(item, prompt, tuple(s for s in range(cfg.num_samples) if (item.id, s) not in done))
        for item, prompt in prepared
    ]
    pending = [p for p in pending if p.samples]
    if pending and not shards:
        # Recorded before the first shard, so a later run can tell whether it may add to them.
        io.write_json(io.join(output_uri, PARAMS_NAME), {"generation": params})
    reused = 0
    if cache is not None and pending:
        pending, reused = write_reused(pending, cache.load(), cfg, output_uri, shards, teacher_id=teacher_id)
        shards = list_shards(output_uri)
    run = _generate_shards(pending, backend, cfg, output_uri, shards, teacher_id=teacher_id, progress=progress, cache=cache)
    run["resumed_records"] = len(done)
    run["reused_records"] = reused
    return run


def _write_manifest(
    output_uri: str,
    *,
    inputs: dict[str, Any],
    prompts_uri: str,
    teacher_id: str,
    backend: TeacherBackend,
    cfg: GenerateConfig,
    prompt_counts: dict[str, int],
    run: dict[str, Any],
    cache: ResponseCache | None,
    lineage: dict[str, Any] | None,
) -> dict[str, Any]:
    """Write the manifest (what makes the output complete) and say what this run did."""
    summary = summarize_output(output_uri)
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
        sampling=sampling_dict(cfg),
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


def _generate_shards(
    pending: list[Pending],
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
    sampling_record = sampling_dict(cfg)
    next_index = next_shard_index(shards)

    # Shards hold whole prompts (all their missing samples), so a crash never splits a prompt.
    chunks: list[list[Pending]] = []
    size = 0
    for entry in pending:
        if chunks and size + len(entry.samples) <= cfg.shard_size:
            chunks[-1].append(entry)
            size += len(entry.samples)
        else:
            chunks.append([entry])
            size = len(entry.samples)

    total = sum(len(e.samples) for e in pending)
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
    from mydistill.progress import ProgressLog, current_sink

    if not enabled or current_sink() is not None:  # no terminal (a worker's log), or a caller collects reports
        yield ProgressLog("generate", total, logger, unit="responses")
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
