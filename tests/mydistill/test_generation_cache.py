"""Teacher responses reused across runs: only new prompts go to the teacher, reused records are
byte-identical, a changed teacher reuses nothing, and a killed run keeps what it paid for."""

from __future__ import annotations

import json

import pytest

from mydistill import io
from mydistill.generation import Completion, GenerateConfig, generate_responses, read_responses
from mydistill.generation.shards import CACHE_SHARD_RE, ResponseCache, list_shards

from tests.mydistill.generation_fixtures import write_prompts
from tests.mydistill.test_generation_stage import FakeBackend


class NightBackend(FakeBackend):
    """Answers differ from one night to the next: a response asked again would show it."""

    def __init__(self, night: str, **kwargs):
        super().__init__(**kwargs)
        self.night = night

    def generate(self, requests, sampling, on_progress=None):
        out = super().generate(requests, sampling, on_progress)
        return [[Completion(f"{c.text} ({self.night})", c.finish_reason, c.prompt_tokens, c.completion_tokens) for c in per] for per in out]


def _lines(output_uri: str) -> dict[str, str]:
    """id -> the record's JSONL line, as written."""
    lines = {}
    for name in list_shards(output_uri):
        for line in io.read_text(io.join(output_uri, name)).splitlines():
            lines[json.loads(line)["id"]] = line
    return lines


def _run(tmp_path, out: str, backend, *, teacher_fp: str = "teacher-A", cfg: GenerateConfig | None = None):
    return generate_responses(
        str(tmp_path / "p.jsonl"), str(tmp_path / out), teacher="T", cfg=cfg or GenerateConfig(shard_size=4),
        backend=backend, cache_uri=str(tmp_path / "cache"), teacher_fingerprint=teacher_fp,
    )


def test_only_new_prompts_go_to_the_teacher_and_reused_records_are_byte_identical(tmp_path):
    write_prompts(tmp_path / "p.jsonl", [f"w{i} x" for i in range(10)])
    first = _run(tmp_path, "night1", NightBackend("night 1"))
    assert first["counts"]["generated"] == 10 and first["counts"]["reused"] == 0

    write_prompts(tmp_path / "p.jsonl", [f"w{i} x" for i in range(13)])  # three new prompts
    backend = NightBackend("night 2")
    second = _run(tmp_path, "night2", backend)
    assert [k for call in backend.calls for k in call] == ["q0010", "q0011", "q0012"]
    assert second["counts"]["generated"] == 3 and second["counts"]["reused"] == 10 and second["records"] == 13
    before, after = _lines(str(tmp_path / "night1")), _lines(str(tmp_path / "night2"))
    assert all(after[i] == line for i, line in before.items())  # byte-identical
    assert "(night 2)" in after["q0012"]


def test_a_changed_teacher_or_other_settings_reuse_nothing(tmp_path):
    write_prompts(tmp_path / "p.jsonl", [f"w{i} x" for i in range(5)])
    _run(tmp_path, "a", NightBackend("1"))
    other_teacher = _run(tmp_path, "b", NightBackend("2"), teacher_fp="teacher-B")
    assert other_teacher["counts"]["generated"] == 5 and other_teacher["counts"]["reused"] == 0
    warmer = _run(tmp_path, "c", NightBackend("3"), cfg=GenerateConfig(shard_size=4, temperature=0.9))
    assert warmer["counts"]["reused"] == 0


def test_failed_generations_are_asked_again(tmp_path):
    write_prompts(tmp_path / "p.jsonl", ["w1 x", "FAIL y"])
    _run(tmp_path, "a", NightBackend("1"))
    backend = NightBackend("2")
    manifest = _run(tmp_path, "b", backend)
    assert [k for call in backend.calls for k in call] == ["q0001"] and manifest["counts"]["reused"] == 1


def test_a_killed_run_loses_nothing_it_generated_and_duplicates_nothing(tmp_path):
    write_prompts(tmp_path / "p.jsonl", [f"w{i} x" for i in range(12)])
    with pytest.raises(RuntimeError, match="injected crash"):
        _run(tmp_path, "a", NightBackend("1", crash_after=2))  # two shards of four written, then killed
    cache_shards = [n for folder in (tmp_path / "cache").iterdir() for n in list_shards(str(folder), CACHE_SHARD_RE)]
    assert len(cache_shards) == 2  # written before their output shards

    # the same output resumes; another output (the plan moved on) reuses the cache
    backend = NightBackend("2")
    resumed = _run(tmp_path, "a", backend)
    assert len([k for call in backend.calls for k in call]) == 4
    assert resumed["counts"]["resumed"] == 8 and resumed["records"] == 12
    elsewhere = _run(tmp_path, "b", NightBackend("3"))
    assert elsewhere["counts"]["reused"] == 12 and elsewhere["counts"]["generated"] == 0
    ids = [r["id"] for r in read_responses(str(tmp_path / "b"))]
    assert len(ids) == len(set(ids)) == 12


def test_cache_entries_are_keyed_by_teacher_and_content_settings(tmp_path):
    a = ResponseCache(str(tmp_path), teacher_fingerprint="A", params=GenerateConfig().content_params())
    b = ResponseCache(str(tmp_path), teacher_fingerprint="A", params=GenerateConfig(batch_size=3).content_params())
    c = ResponseCache(str(tmp_path), teacher_fingerprint="B", params=GenerateConfig().content_params())
    assert a.uri == b.uri != c.uri  # batching is not content; the teacher is
