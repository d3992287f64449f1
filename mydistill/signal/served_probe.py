"""The served teacher's identity: a *probe*, its top-k log-probs on a fixed text, recorded with a store.

A re-run or a resume re-probes and refuses a store begun by another model behind the same URL
(:class:`ProbeMismatch`). The probe is also scored at temperature 1 and at the store's temperature:
equal answers mean the server returns raw log-probs (vLLM's default), answers tempered by T mean
it applied T (vLLM ``--logprobs-mode processed_logprobs``); anything else is an error.
"""

from __future__ import annotations

import math
import re
import statistics
from typing import Any

from mydistill.config.generation import mask_url
from mydistill.signal.served_client import CompletionsScorer, Scored, ServedTeacherError

# Scored at the start of every run to identify the model behind the URL; short, so it fits any context.
PROBE_TEXT = "The quick brown fox: sort dbcaf, 0 1 2 3."
PROBE_POSITIONS, PROBE_TOP = 16, 8  # positions of the probe, and entries per position, kept in the manifest


class ProbeMismatch(ServedTeacherError):
    """The model behind the endpoint is not the one that began (or finished) this store."""


def probe_teacher(scorer: CompletionsScorer, temperature: float) -> dict[str, Any]:
    """The served teacher's fingerprint: model name and top-k log-probs on :data:`PROBE_TEXT`, and the
    temperature the server applies to the log-probs it returns (1: raw, or the requested one)."""
    raw = _probe_once(scorer, 1.0)
    applied = 1.0
    if not math.isclose(temperature, 1.0):
        tempered = _probe_once(scorer, temperature)
        applied = _applied_temperature(raw, tempered, temperature)
    positions = [
        None if p is None else sorted(([t, round(v, 5)] for t, v in p.items()), key=lambda tv: -tv[1])[:PROBE_TOP]
        for p in raw.positions[: PROBE_POSITIONS + 1]
    ]
    return {"model": raw.model, "token_ids": raw.token_ids, "top_logprobs": positions, "temperature_applied": applied}


def _probe_once(scorer: CompletionsScorer, temperature: float) -> Scored:
    (answer,) = scorer.score([PROBE_TEXT], add_special_tokens=True, temperature=temperature)
    no_logprobs = ServedTeacherError(
        f"{mask_url(scorer.api_base)} returned no log-probs for the prompt's tokens with "
        f"signal.logprobs_mode: {scorer.cfg.logprobs_mode}; the server must support "
        + ("echo with logprobs" if scorer.cfg.logprobs_mode == "echo" else "vLLM's prompt_logprobs")
        + " (try the other logprobs_mode)"
    )
    if isinstance(answer, str) and answer.startswith("no log-probs"):
        raise no_logprobs
    if isinstance(answer, str):
        hint = ""
        if answer.startswith("HTTP 4") and "logprobs" in answer:
            cap = re.search(r"max(?:imum)? allowed:? (\d+)", answer)
            hint = (
                f" The server caps log-probs per position below signal.k = {scorer.cfg.k}: start vLLM with "
                f"--max-logprobs {scorer.cfg.k} (its default is 20), or set signal.k to at most "
                f"{cap.group(1) if cap else 'its cap'}."
            )
        raise ServedTeacherError(f"{mask_url(scorer.api_base)}: the probe request was refused: {answer}.{hint}")
    listed = [p for p in answer.positions[1:] if p is not None]
    if not listed:
        raise no_logprobs
    fewest = min(len(p) for p in listed)
    if fewest < scorer.cfg.k:
        raise ServedTeacherError(
            f"{mask_url(scorer.api_base)} returned only {fewest} log-probs per position, signal.k is {scorer.cfg.k}; "
            f"raise the server's cap (vLLM: --max-logprobs {scorer.cfg.k}) or set signal.k: {fewest}"
        )
    return answer


def _applied_temperature(raw: Scored, tempered: Scored, requested: float) -> float:
    """1 if the tempered answer equals the raw one, ``requested`` if its log-prob gaps shrank by that factor."""
    ratios = []
    for a, b in zip(raw.positions[1:], tempered.positions[1:]):
        if not a or not b:
            continue
        best = max(a, key=a.get)
        for t in set(a) & set(b):
            gap_raw, gap_tempered = a[best] - a[t], b.get(best, math.nan) - b[t]
            if gap_raw > 1e-3 and gap_tempered > 1e-6:
                ratios.append(gap_raw / gap_tempered)
    if not ratios:
        return 1.0
    ratio = statistics.median(ratios)
    for candidate in (1.0, requested):
        if abs(ratio - candidate) <= 0.02 * candidate:
            return candidate
    raise ServedTeacherError(
        f"the server's log-probs at temperature {requested} relate to those at 1 as temperature {ratio:.3f}, "
        f"neither 1 (raw log-probs) nor {requested}: it processes log-probs in a way this stage cannot store"
    )


def check_probe(recorded: dict[str, Any], now: dict[str, Any], *, where: str, tolerance: float) -> None:
    """Raise :class:`ProbeMismatch` unless ``now`` is the same model as ``recorded``."""
    problems = []
    if recorded.get("model") != now.get("model"):
        problems.append(f"the server reports model {now.get('model')!r}, the store was made with {recorded.get('model')!r}")
    if recorded.get("temperature_applied") != now.get("temperature_applied"):
        problems.append(
            f"the server now applies temperature {now.get('temperature_applied')} to log-probs, "
            f"then {recorded.get('temperature_applied')}"
        )
    if recorded.get("token_ids") != now.get("token_ids"):
        problems.append("the probe text is tokenized differently")
    worst, unshared = 0.0, 0
    for a, b in zip(recorded.get("top_logprobs") or [], now.get("top_logprobs") or []):
        if not a or not b:
            continue
        b_lp = dict((t, v) for t, v in b)
        shared = [abs(v - b_lp[t]) for t, v in a if t in b_lp]
        unshared += len(shared) < len(a) // 2  # another model lists other tokens
        worst = max([worst, *shared])
    if unshared:
        problems.append(f"its top tokens on the probe text differ at {unshared} positions")
    if worst > tolerance:
        problems.append(
            f"its log-probs on the probe text moved by up to {worst:.3g} nats (tolerance signal.probe_tolerance = {tolerance})"
        )
    if problems:
        raise ProbeMismatch(
            f"{where}: the served teacher is not the model this store was "
            + ("made" if where.endswith("manifest.json") else "begun")
            + " with: "
            + "; ".join(problems)
            + ". If the model was swapped on purpose, delete the store folder (or change work_dir) to compute it anew "
            "from the new model; otherwise point signal.api_base back at the original model."
        )
