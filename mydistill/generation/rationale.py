"""Rationale mode (distilling step-by-step): ask for a rationale and an answer, then split them.

Hsieh et al., "Distilling Step-by-Step!" (2023) train the student on the teacher's rationale and
its label as two tasks. The teacher is asked for both in one response; the response is parsed
with a configurable pattern, and a response that does not parse is kept with status 'unparsed'
so that nothing is dropped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from mydistill.config.generation import DEFAULT_RATIONALE_PATTERN, DEFAULT_RATIONALE_TEMPLATE


def apply_template(prompt: str, template: str = DEFAULT_RATIONALE_TEMPLATE) -> str:
    """The user message for ``prompt``. Only ``{prompt}`` is replaced, so braces elsewhere are safe."""
    return template.replace("{prompt}", prompt)


@dataclass(frozen=True)
class ParsedRationale:
    rationale: str | None
    answer: str | None

    @property
    def ok(self) -> bool:
        return bool(self.rationale) and bool(self.answer)


@lru_cache(maxsize=16)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def parse_rationale(response: str, pattern: str = DEFAULT_RATIONALE_PATTERN) -> ParsedRationale:
    """Split ``response`` into rationale and answer with ``pattern`` (named groups 'rationale', 'answer').

    Both fields are stripped; a missing match or an empty group gives ``ok == False``.
    """
    match = _compile(pattern).search(response)
    if match is None:
        return ParsedRationale(None, None)
    rationale, answer = match.group("rationale"), match.group("answer")
    return ParsedRationale(
        rationale.strip() if rationale and rationale.strip() else None,
        answer.strip() if answer and answer.strip() else None,
    )
