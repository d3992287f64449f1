"""The signal stage: run the teacher once over the training mix and store its sparse signal.

>>> manifest = compute_teacher_signal("runs/mix-…/train.jsonl", "teacher/", "runs/signal-…", cfg=SignalConfig(), max_length=512)

Examples are keyed by the sha256 of their text (upsampled copies in the mix are computed and
stored once), tokenized exactly as the distill stage tokenizes them
(:func:`mydistill.tokenization.tokenize_example`), run through the teacher in length-sorted
batches, and only the response positions (label != -100 after :func:`shift_labels`) are projected
to the vocabulary, ``chunk_tokens`` rows at a time, so full ``(B, T, V)`` logits never exist.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import torch

from mydistill import io
from mydistill.config.signal import SignalConfig
from mydistill.signal.format import FORMAT_VERSION, example_key
from mydistill.signal.sampling import sparsify
from mydistill.signal.store import SignalStoreWriter, read_signal_records, write_store_manifest
from mydistill.tokenization import IGNORE_INDEX, collate, shift_labels, tokenize_example, tokenizer_sha256

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_sha256(model_uri: str) -> str:
    """sha256 over the teacher folder's weight files (name and bytes, sorted by name), streamed."""
    fs, path = io.filesystem(model_uri)
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise io.DataError(f"{model_uri}: no weight files (*.safetensors, *.bin) to hash")
    h = hashlib.sha256()
    for name in files:
        h.update(name.rsplit("/", 1)[-1].encode())
        with fs.open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def signal_inputs(
    data_sha256: str, teacher_uri: str, weights: str, tokenizer: str, cfg: SignalConfig, max_length: int
) -> dict[str, Any]:
    """What a store is made from; its hash decides whether an existing store can be reused."""
    return {
        "data_sha256": data_sha256,
        "teacher_uri": teacher_uri,
        "weights_sha256": weights,
        "tokenizer_sha256": tokenizer,
        "max_length": max_length,
        "format_version": FORMAT_VERSION,
        **cfg.model_dump(include={"k", "mode", "sampled_tokens", "seed"}),
        "temperature": store_temperature(cfg),
    }


def store_temperature(cfg: SignalConfig) -> float:
    """The temperature a store is computed at (the pipeline fills in the loss temperature; 1 otherwise)."""
    return 1.0 if cfg.temperature is None else float(cfg.temperature)


def compute_teacher_signal(
    data_uri: str,
    teacher_uri: str,
    output_uri: str,
    *,
    cfg: SignalConfig,
    max_length: int,
    teacher_id: str | None = None,
    teacher: Any = None,
    tokenizer: Any = None,
    divergence: str = "forward_kl",
    lineage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the teacher-signal store for the records at ``data_uri``; returns its manifest.

    ``teacher`` / ``tokenizer`` may be passed already loaded (tests, benchmarks); otherwise they are
    loaded from ``teacher_uri``. ``divergence``, that of the distill loss the store is made for,
    decides ``cfg.mode == "auto"`` (:meth:`SignalConfig.resolved_mode`), and the store, its inputs
    and its manifest only ever name the concrete mode. A store already made from the same inputs
    is reused. ``lineage`` (teacher fingerprint, tokenizer, …; :mod:`mydistill.lineage`) is
    recorded in the manifest as given.
    """
    from mydistill.generation.hf import load_teacher, load_tokenizer, resolve_device

    cfg = cfg.model_copy(update={"mode": cfg.resolved_mode(divergence)})

    records = read_signal_records(data_uri)
    if tokenizer is None:
        tokenizer = load_tokenizer(teacher_uri)
    data_sha = io.records_sha256(records)
    weights = weights_sha256(teacher_uri)
    tok_sha = tokenizer_sha256(tokenizer)
    inputs = signal_inputs(data_sha, teacher_uri, weights, tok_sha, cfg, max_length)
    done = io.manifest_matches(output_uri, inputs)
    if done:
        return done

    start = time.perf_counter()
    # one entry per distinct text: upsampled duplicates share it
    unique: dict[bytes, Any] = {}
    for r in records:
        key = example_key(r["prompt"], r["response"])
        if key not in unique:
            unique[key] = tokenize_example(tokenizer, r["prompt"], r["response"], max_length)
    device = resolve_device(cfg.device)
    if teacher is None:
        teacher = load_teacher(teacher_uri, device=device, dtype=cfg.dtype)
    else:
        teacher = teacher.to(device).eval()
    vocab = teacher.get_output_embeddings().weight.shape[0]
    exact = min(cfg.exact_tokens(cfg.mode), vocab)  # the k entries: exact top tokens (+ sampled tail slots)
    slots = exact + (min(cfg.sampled_tokens, vocab - exact) if cfg.mode == "sampled" else 0)
    writer = SignalStoreWriter(output_uri, slots=slots, shard_bytes=cfg.shard_mb * 2**20)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items = sorted(unique.items(), key=lambda kv: len(kv[1].input_ids))  # little padding per batch
    _add_batches(teacher, items, writer, cfg, exact=exact, device=device, pad_id=pad_id)
    written = writer.close()
    seconds = time.perf_counter() - start
    logger.info(
        "teacher signal: %d examples, %d tokens, %.1f bytes/token, %.1fs",
        written["counts"]["examples"], written["counts"]["tokens"], written["bytes_per_token"], seconds,
    )
    return write_store_manifest(
        output_uri, inputs=inputs, written=written,
        teacher={"id": teacher_id or io.basename(teacher_uri), "uri": teacher_uri, "weights_sha256": weights},
        tokenizer_sha256=tok_sha, data_sha256=data_sha, data_uri=data_uri, records=len(records), vocab_size=vocab,
        k=exact, slots=slots, mode=cfg.mode, sampled_tokens=cfg.sampled_tokens if cfg.mode == "sampled" else 0,
        temperature=store_temperature(cfg), max_length=max_length, seconds=seconds,
        **({"lineage": lineage} if lineage else {}),
    )


def _add_batches(
    teacher: Any, items: list[tuple[bytes, Any]], writer: SignalStoreWriter, cfg: SignalConfig, *, exact: int, device: Any, pad_id: int,
) -> None:
    """Run ``teacher`` over ``items`` (key, tokenized example) in batches and add each example's sparse
    signal (``exact`` top tokens, plus the sampled tail in sampled mode) to ``writer``."""
    from mydistill.progress import ProgressLog

    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    base = getattr(teacher, teacher.base_model_prefix)
    head = teacher.get_output_embeddings()
    report = ProgressLog("signal", len(items), logger, unit="examples")
    for begin in range(0, len(items), cfg.batch_size):
        part = items[begin : begin + cfg.batch_size]
        batch = {k: v.to(device) for k, v in collate([ex for _, ex in part], pad_id).items()}
        labels = shift_labels(batch["labels"])
        with torch.inference_mode():
            hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            valid = labels != IGNORE_INDEX
            rows = hidden[valid]  # (n, H), response positions of the batch in row-major order
            chunks = [
                sparsify(
                    head(rows[i : i + cfg.chunk_tokens]),
                    exact,
                    mode=cfg.mode,
                    sampled_tokens=cfg.sampled_tokens,
                    temperature=store_temperature(cfg),
                    generator=generator,
                )
                for i in range(0, rows.shape[0], cfg.chunk_tokens)
            ]
        ids = torch.cat([c.token_ids for c in chunks]).cpu().numpy()
        lps = torch.cat([c.log_probs for c in chunks]).float().cpu().numpy()
        res = torch.cat([c.residual for c in chunks]).float().cpu().numpy()
        counts = valid.sum(-1).tolist()
        offset = 0
        for (key, _), n in zip(part, counts, strict=True):
            writer.add(key, ids[offset : offset + n], lps[offset : offset + n], res[offset : offset + n])
            offset += n
        report(len(part))
