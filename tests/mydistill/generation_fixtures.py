"""Tiny teachers and tokenizers for the generation tests, built locally (no model hub).

- :func:`build_tokenizer`: a word-level tokenizer (``tokenizers`` library) with or without a chat
  template.
- :func:`build_random_teacher`: a 2-layer Llama with random weights (throughput, batching
  equivalence, truncation).
- :func:`build_trained_teacher`: the same model trained for a few seconds to answer every prompt
  with ``rationale : the last word is X . answer : X`` and stop, where X is the prompt's last
  word (a prompt from :func:`teacher_prompts`). Its answers depend on the prompt, so a response
  filed under the wrong prompt is caught. (The last word, not the first: copying from a fixed
  distance before the answer is learnt reliably in a few hundred steps; the first word is not.)

Builders write into a folder and reuse it when it already holds the model (one build per test
session, even when several test modules ask).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
WORDS = ["apple", "boat", "cloud", "desk", "eagle", "fern", "grape", "house", "iron", "jade", "kite", "lamp"]
GLUE = ["rationale", "answer", ":", ".", "the", "first", "last", "word", "is", "what", "?", "and", "of", "long"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(chat_template: bool = True) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS + GLUE + [str(i) for i in range(40)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _model_config(vocab_size: int, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=96,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_random_teacher(folder: str | Path, *, chat_template: bool = True, seed: int = 0, **overrides: Any) -> str:
    """A random-weight tiny Llama + tokenizer saved in ``folder``; returns the folder."""
    folder = str(folder)
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer(chat_template)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_model_config(len(tokenizer), **overrides)).eval()
    _save(model, tokenizer, folder)
    return folder


def target_response(prompt: str) -> str:
    last = prompt.split()[-1]
    return f"rationale : the last word is {last} . answer : {last}"


def random_prompt(rng: random.Random, min_words: int = 2, max_words: int = 10) -> str:
    return " ".join(rng.choice(WORDS + GLUE[4:]) for _ in range(rng.randint(min_words, max_words)))


def _teacher_prompt(rng: random.Random) -> str:
    return (random_prompt(rng, 0, 9) + " " + rng.choice(WORDS)).strip()


def teacher_prompts(n: int, seed: int = 0) -> list[str]:
    """Prompts the trained teacher answers right: 0-9 random words, then one of WORDS."""
    rng = random.Random(seed)
    return [_teacher_prompt(rng) for _ in range(n)]


def build_trained_teacher(folder: str | Path, *, max_steps: int = 2000, seed: int = 0) -> str:
    """A tiny Llama trained to answer ``target_response(prompt)`` then stop; returns the folder.

    Trains until the loss is small *and* greedy answers are right on 128 fresh prompts, then a
    little more for margin, so that bf16 on a GPU or another torch version gives the same answers.
    """
    folder = str(folder)
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_tokenizer(chat_template=True)
    model = LlamaForCausalLM(_model_config(len(tokenizer)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    checks = teacher_prompts(128, seed=seed + 1)
    steps = 0
    with torch_threads(1):
        while steps < max_steps:
            loss = _train(model, tokenizer, optimizer, rng, 50)
            steps += 50
            if loss < 0.01 and _all_correct(model, tokenizer, checks):
                _train(model, tokenizer, optimizer, rng, 100)  # margin
                break
        else:
            raise RuntimeError(f"the tiny teacher did not learn its task in {max_steps} steps")
    model.eval()
    _save(model, tokenizer, folder)
    return folder


def _batch(tokenizer: Any, rng: random.Random, size: int) -> tuple[Any, Any, Any]:
    import torch

    rows, labels = [], []
    for _ in range(size):
        prompt = _teacher_prompt(rng)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        p_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(target_response(prompt), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert tokenizer.unk_token_id not in p_ids + r_ids, f"not in the vocabulary: {prompt!r}"
        rows.append(p_ids + r_ids)
        labels.append([-100] * len(p_ids) + r_ids)
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask, lab


def _train(model: Any, tokenizer: Any, optimizer: Any, rng: random.Random, steps: int) -> float:
    model.train()
    loss = None
    for _ in range(steps):
        ids, mask, lab = _batch(tokenizer, rng, 16)
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return float(loss.item()) if loss is not None else float("inf")


def _all_correct(model: Any, tokenizer: Any, prompts: list[str]) -> bool:
    import torch

    model.eval()
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, encoded))
    ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=0)
    answers = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return all(a.strip() == target_response(p) for a, p in zip(answers, prompts, strict=True))


def _save(model: Any, tokenizer: Any, folder: str) -> None:
    tmp = folder + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)


def write_prompts(path: str | Path, prompts: list[str], *, with_ids: bool = True, **extra_fields: list[Any]) -> str:
    path = str(path)
    with open(path, "w", encoding="utf-8") as f:
        for i, prompt in enumerate(prompts):
            record: dict[str, Any] = {"prompt": prompt}
            if with_ids:
                record["id"] = f"q{i:04d}"
            for name, values in extra_fields.items():
                record[name] = values[i]
            f.write(json.dumps(record) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# the OpenAI-compatible server as a subprocess


class ServerProcess:
    """``python -m mydistill.generation.serve`` on a free port of 127.0.0.1, stopped on close()."""

    def __init__(self, model_dir: str, *extra_args: str, env: dict[str, str] | None = None, timeout_s: float = 120):
        cmd = [sys.executable, "-m", "mydistill.generation.serve", "--model", model_dir, "--port", "0", *extra_args]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # One intra-op thread: tiny models gain nothing from more, and threads spinning
            # against the test process on a 2-core machine slow both down by orders of magnitude.
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )
        self.output: list[str] = []
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("server exited before serving:\n" + "".join(self.output))
            self.output.append(line)
            if line.startswith("serving "):
                self.api_base = line.split(" at ")[1].strip()
                break
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("server did not start:\n" + "".join(self.output))
        self.base_url = self.api_base.rsplit("/v1", 1)[0]

    def close(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rest = self.proc.stdout.read() if self.proc.stdout else ""
        self.output.append(rest or "")
        return "".join(self.output)


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads, then restore the previous setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def unused_port() -> int:
    """A port nothing listens on (for the unreachable-server test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
