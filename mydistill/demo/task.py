"""The demo task: string transforms with a checkable answer, generated offline.

Each prompt asks for one transform of a short random word (``reverse: dbca`` → ``acbd``). The
space of words is large, so a student cannot memorise its way through a small labelled set: it
has to learn the transforms, and the teacher's answers on a larger unlabelled pool are what make
that possible.
"""

from __future__ import annotations

import random
from collections.abc import Callable

ALPHABET = "abcdefgh"

OPERATIONS: dict[str, Callable[[str], str]] = {
    "reverse": lambda w: w[::-1],
    "sort": lambda w: "".join(sorted(w)),
}


def make_word(rng: random.Random, min_len: int, max_len: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(min_len, max_len)))


def solve(prompt: str) -> str:
    """The correct answer for a demo prompt (``"reverse: abc"`` → ``"cba"``)."""
    op, _, word = prompt.partition(": ")
    if op not in OPERATIONS:
        raise ValueError(f"not a demo prompt: {prompt!r}")
    return OPERATIONS[op](word)


def category_of(prompt: str) -> str:
    """The transform a demo prompt asks for (``"reverse: abc"`` → ``"reverse"``): its category in the eval set."""
    return prompt.partition(": ")[0]


def make_examples(
    n: int, *, seed: int, min_len: int = 3, max_len: int = 6, exclude: set[str] | None = None
) -> list[dict[str, str]]:
    """``n`` distinct labelled examples ``{"id", "prompt", "answer"}``, none of whose prompts is in ``exclude``."""
    rng = random.Random(seed)
    exclude = set(exclude or ())
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    ops = sorted(OPERATIONS)
    while len(out) < n:
        prompt = f"{rng.choice(ops)}: {make_word(rng, min_len, max_len)}"
        if prompt in seen or prompt in exclude:
            continue
        seen.add(prompt)
        out.append({"id": f"demo-{seed}-{len(out)}", "prompt": prompt, "answer": solve(prompt)})
    return out


def corpus_for_tokenizer() -> list[str]:
    """Text the demo tokenizer is trained on: every character the task can produce."""
    rng = random.Random(0)
    return [f"{op}: {make_word(rng, 3, 8)}" for op in OPERATIONS for _ in range(200)]
