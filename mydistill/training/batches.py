"""Training data: records read and checked once, tokenized, and each rank's share of every batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from mydistill import io
from mydistill.tokenization import TokenizedExample, tokenize_example, with_prefix


def read_training_records(uri: str) -> list[dict[str, Any]]:
    """The ``prompt``/``response`` records at ``uri``; a DataError names the file and the record when
    one lacks a field, or the file when it has none."""
    records = io.read_records(uri)
    for i, r in enumerate(records):
        if "prompt" not in r or "response" not in r:
            raise io.DataError(f"{uri}: record {i + 1} needs 'prompt' and 'response' fields (has {sorted(r)})")
    if not records:
        raise io.DataError(f"{uri}: no training records")
    return records


def tokenize_records(records: list[dict[str, Any]], tokenizer: Any, max_length: int, prompt_prefix: str = "") -> list[TokenizedExample]:
    """Tokenized records; ``prompt_prefix`` goes before every prompt (a task prefix)."""
    return [tokenize_example(tokenizer, with_prefix(prompt_prefix, r["prompt"]), r["response"], max_length) for r in records]


def load_examples(uri: str, tokenizer: Any, max_length: int, prompt_prefix: str = "") -> list[TokenizedExample]:
    """Tokenized ``prompt``/``response`` records from ``uri`` (see :func:`read_training_records`)."""
    return tokenize_records(read_training_records(uri), tokenizer, max_length, prompt_prefix)


def batch_indices(num_examples: int, batch_size: int, seed: int, *, start_step: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[list[int]]:
    """Example indices of this rank's share of each global batch, from step ``start_step`` on.

    One seeded permutation per epoch; global batch s is ``world_size * batch_size`` consecutive
    indices of it, and rank r takes the r-th slice. Resuming at step k replays only the
    permutations (no tokenizing or collating), so the data position is exactly where it was.
    """
    global_batch = batch_size * world_size
    per_epoch = max(1, num_examples // global_batch)
    generator = torch.Generator().manual_seed(seed)
    epoch = 0
    order = torch.randperm(num_examples, generator=generator).tolist()
    step = 0
    while True:
        if step // per_epoch > epoch:
            epoch += 1
            order = torch.randperm(num_examples, generator=generator).tolist()
        if step >= start_step:
            start = (step % per_epoch) * global_batch + rank * batch_size
            chunk = order[start : start + batch_size]
            if len(chunk) < batch_size:  # fewer examples than one global batch: wrap around
                chunk = [order[(start + i) % num_examples] for i in range(batch_size)]
            yield chunk
        step += 1
