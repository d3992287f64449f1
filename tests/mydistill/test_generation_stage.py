"""The generate stage around a backend: prompts, records, statuses, shards, resume, manifests.

A deterministic in-process backend stands in for the teacher here (fast, no torch); the real
backends are exercised in test_generation_hf.py and test_generation_openai.py.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import fsspec
import pytest

from mydistill import io
from mydistill.generation import (
    Completion,
    GenerateConfig,
    GenerationRequest,
    PreparedPrompt,
    Sampling,
    TeacherBackend,
    generate_responses,
    load_prompts,
    read_responses,
)
from mydistill.generation.shards import PARAMS_NAME, RATIONALE_FIELDS, RECORD_FIELDS, build_record, record_status
from mydistill.io import DataError

from tests.mydistill.generation_fixtures import write_prompts


class FakeBackend(TeacherBackend):
    """One token per word; the response depends on the prompt's words.

    EMPTY -> empty response, LONG -> hits max_new_tokens, FAIL -> error, NOPARSE -> no labels.
    """

    name = "fake"

    def __init__(self, window: int | None = None, crash_after: int | None = None):
        self.window = window
        self.crash_after = crash_after
        self.calls: list[list[str]] = []

    def context_window(self, max_new_tokens: int) -> int | None:
        return self.window

    def prepare(self, key: str, message: str) -> PreparedPrompt:
        # two "template" tokens around the words
        return PreparedPrompt(key, message, f"<u> {message} <a>", list(range(len(message.split()) + 2)))

    def truncate(self, prompt: PreparedPrompt, max_tokens: int) -> PreparedPrompt | None:
        words = prompt.message.split()[-(max_tokens - 2) :] if max_tokens > 2 else []
        if not words:
            return None
        cut = self.prepare(prompt.key, " ".join(words))
        cut.truncated = True
        return cut

    def generate(self, requests, sampling, on_progress=None):
        if self.crash_after is not None and len(self.calls) >= self.crash_after:
            raise RuntimeError("injected crash")
        self.calls.append([r.prompt.key for r in requests])
        out = []
        for request in requests:
            words = request.prompt.message.split()
            per = []
            for s in request.sample_indices:
                if "EMPTY" in words:
                    per.append(Completion("  ", "stop", len(words), 1))
                elif "LONG" in words:
                    per.append(Completion("rationale : and on and on", "length", len(words), sampling.max_new_tokens))
                elif "FAIL" in words:
                    per.append(Completion("", "error", len(words), 0, error="boom"))
                elif "NOPARSE" in words:
                    per.append(Completion("I refuse to use labels", "stop", len(words), 5))
                else:
                    text = f"rationale : {words[0]} then sample {s} . answer : {words[0]}"
                    per.append(Completion(text, "stop", len(words), len(text.split()) + 1))
            out.append(per)
            if on_progress:
                on_progress(len(per))
        return out


def _ids(records):
    return Counter((r["id"], r["sample_index"]) for r in records)


# ----------------------------------------------------------------------------------------------
# prompts


def test_load_prompts_counts_empty_and_duplicates_and_derives_stable_ids(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "alpha", "answer": "a"},
        {"prompt": "   "},
        {"prompt": None},
        {"prompt": "alpha", "answer": "a"},  # exact duplicate: skipped, counted
        {"prompt": "alpha", "answer": "b"},  # same prompt, other fields: its own id
        {"id": 7, "prompt": "beta"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = load_prompts(str(path))
    assert prompts.counts == {"records": 6, "empty": 2, "duplicate": 1, "used": 3}
    ids = [item.id for item in prompts.items]
    assert ids[2] == "7" and ids[0].startswith("p-") and ids[0] != ids[1]
    assert load_prompts(str(path)).items[0].id == ids[0]  # stable
    assert prompts.items[0].fields == {"answer": "a"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "ok"}\n{"prompt": "broken\n', r"p\.jsonl:2: malformed JSON"),
        ('{"prompt": "ok"}\n{"text": "no prompt"}\n', r"p\.jsonl: record 2: no 'prompt' field"),
        ('{"prompt": 5}\n', "'prompt' must be a string"),
        ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "id 'a' already used by .*record 1"),
    ],
)
def test_bad_prompt_files_raise_before_anything_is_written(tmp_path, content, message):
    (tmp_path / "p.jsonl").write_text(content)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        generate_responses(
            str(tmp_path / "p.jsonl"), str(out), teacher="t", cfg=GenerateConfig(), backend=FakeBackend()
        )
    assert not out.exists()


def test_zero_prompts_is_an_error(tmp_path):
    write_prompts(tmp_path / "p.jsonl", ["", "  "])
    with pytest.raises(DataError, match=r"no prompts to generate from .*2 empty"):
        generate_responses(
            str(tmp_path / "p.jsonl"), str(tmp_path / "o"), teacher="t", cfg=GenerateConfig(), backend=FakeBackend()
        )


def test_folder_of_jsonl_and_parquet_shards_is_read(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    write_prompts(folder / "a.jsonl", ["one", "two"])
    io.write_records(str(folder / "b.parquet"), [{"id": "x", "prompt": "three", "source": "pq"}])
    manifest = generate_responses(
        str(folder), str(tmp_path / "o"), teacher="t", cfg=GenerateConfig(), backend=FakeBackend()
    )
    assert manifest["records"] == 3
    by_id = {r["id"]: r for r in read_responses(str(tmp_path / "o"))}
    assert by_id["x"]["source"] == "pq"


# ----------------------------------------------------------------------------------------------
# records


def test_status_precedence():
    assert record_status(Completion("", "error"), rationale_ok=None) == "failed"
    assert record_status(Completion(" \n", "length"), rationale_ok=None) == "empty"
    assert record_status(Completion("x", "length"), rationale_ok=False) == "truncated"
    assert record_status(Completion("x", "stop"), rationale_ok=False) == "unparsed"
    assert record_status(Completion("x", "stop"), rationale_ok=True) == "ok"
    assert record_status(Completion("x", "stop"), rationale_ok=None) == "ok"


def test_records_carry_input_fields_without_clobbering(tmp_path):
    from mydistill.generation.prompts import PromptItem

    item = PromptItem("q1", "what?", {"answer": "gold", "source": "gsm8k", "status": "draft"})
    prompt = PreparedPrompt("q1", "what?", None, [1, 2, 3])
    completion = Completion("Rationale: r\nAnswer: teacher", "stop", None, 4)
    plain = build_record(item, prompt, 0, completion, teacher_id="T", sampling={"seed": 0}, cfg=GenerateConfig())
    assert plain["answer"] == "gold" and plain["source"] == "gsm8k"
    assert plain["status"] == "ok" and plain["input_status"] == "draft"
    assert plain["prompt_tokens"] == 3  # from the prepared prompt when the backend gives none
    rationale = build_record(
        item, prompt, 0, completion, teacher_id="T", sampling={}, cfg=GenerateConfig(rationale=True)
    )
    assert (rationale["rationale"], rationale["answer"], rationale["input_answer"]) == ("r", "teacher", "gold")


def test_record_schema_and_statuses(tmp_path):
    prompts = ["kite one", "lamp EMPTY", "iron LONG", "jade FAIL", "fern NOPARSE"]
    write_prompts(tmp_path / "p.jsonl", prompts, answer=["k", "l", "i", "j", "f"])
    cfg = GenerateConfig(rationale=True, max_new_tokens=8)
    manifest = generate_responses(
        str(tmp_path / "p.jsonl"), str(tmp_path / "o"), teacher="T", cfg=cfg, backend=FakeBackend()
    )
    records = {r["id"]: r for r in read_responses(str(tmp_path / "o"))}
    statuses = {r["prompt"]: r["status"] for r in records.values()}
    assert statuses == {
        "kite one": "ok",
        "lamp EMPTY": "empty",
        "iron LONG": "truncated",
        "jade FAIL": "failed",
        "fern NOPARSE": "unparsed",
    }
    ok = records["q0000"]
    assert set(ok) == {*RECORD_FIELDS, *RATIONALE_FIELDS, "input_answer"}
    assert (ok["rationale"], ok["answer"], ok["input_answer"]) == ("kite then sample 0 .", "kite", "k")
    assert ok["sampling"] == {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "num_samples": 1, "seed": 0}
    assert records["q0003"]["error"] == "boom" and records["q0003"]["finish_reason"] == "error"
    assert manifest["status_counts"] == {"ok": 1, "empty": 1, "truncated": 1, "failed": 1, "unparsed": 1}
    assert manifest["finish_reason_counts"] == {"stop": 3, "length": 1, "error": 1}
    assert manifest["stage"] == "generate" and manifest["teacher_id"] == "T"
    assert manifest["counts"]["ok"] == 1 and manifest["counts"]["prompts_used"] == 5
    assert all(isinstance(v, int) for v in manifest["counts"].values())
    assert manifest["tokens"]["completion"] == sum(r["completion_tokens"] for r in records.values())


# ----------------------------------------------------------------------------------------------
# shards and resume


@pytest.mark.parametrize("num_samples", [1, 3])
def test_resume_after_a_crash_generates_only_what_is_missing(tmp_path, num_samples):
    prompts = [f"w{i} x" for i in range(23)]
    write_prompts(tmp_path / "p.jsonl", prompts)
    cfg = GenerateConfig(shard_size=5 * num_samples, num_samples=num_samples, temperature=0.8)
    out = str(tmp_path / "o")
    crashing = FakeBackend(crash_after=2)
    with pytest.raises(RuntimeError, match="injected crash"):
        generate_responses(str(tmp_path / "p.jsonl"), out, teacher="T", cfg=cfg, backend=crashing)
    assert sorted(os.listdir(out)) == [PARAMS_NAME, "part-00000.jsonl", "part-00001.jsonl"]  # no manifest: not done
    first = read_responses(out)
    assert len(first) == 10 * num_samples

    resumed = FakeBackend()
    manifest = generate_responses(str(tmp_path / "p.jsonl"), out, teacher="T", cfg=cfg, backend=resumed)
    asked = [key for call in resumed.calls for key in call]
    assert len(asked) == 13 and not {r["id"] for r in first} & set(asked)
    records = read_responses(out)
    counts = _ids(records)
    assert len(counts) == 23 * num_samples and set(counts.values()) == {1}
    assert {s for _, s in counts} == set(range(num_samples))
    assert records[: len(first)] == first  # what was written is never rewritten
    assert manifest["records"] == 23 * num_samples and manifest["run"]["resumed_records"] == 10 * num_samples
    assert manifest["shards"] == [f"part-{i:05d}.jsonl" for i in range(5)]


def test_a_finished_run_is_skipped(tmp_path):
    write_prompts(tmp_path / "p.jsonl", ["a b", "c d"])
    out = str(tmp_path / "o")
    first = generate_responses(str(tmp_path / "p.jsonl"), out, teacher="T", cfg=GenerateConfig(), backend=FakeBackend())
    again = FakeBackend()
    second = generate_responses(
        str(tmp_path / "p.jsonl"), out, teacher="T", cfg=GenerateConfig(batch_size=3), backend=again
    )
    assert again.calls == [] and second == first


def test_a_deleted_shard_is_generated_again(tmp_path):
    write_prompts(tmp_path / "p.jsonl", [f"w{i} x" for i in range(6)])
    out = tmp_path / "o"
    cfg = GenerateConfig(shard_size=2)
    generate_responses(str(tmp_path / "p.jsonl"), str(out), teacher="T", cfg=cfg, backend=FakeBackend())
    (out / "part-00001.jsonl").unlink()
    backend = FakeBackend()
    manifest = generate_responses(str(tmp_path / "p.jsonl"), str(out), teacher="T", cfg=cfg, backend=backend)
    assert backend.calls == [["q0002", "q0003"]] and manifest["records"] == 6
    assert manifest["shards"] == ["part-00000.jsonl", "part-00002.jsonl", "part-00003.jsonl"]


def test_added_prompts_resume_the_same_output(tmp_path):
    write_prompts(tmp_path / "p.jsonl", ["a b", "c d"])
    out = str(tmp_path / "o")
    generate_responses(str(tmp_path / "p.jsonl"), out, teacher="T", cfg=GenerateConfig(), backend=FakeBackend())
    write_prompts(tmp_path / "p.jsonl", ["a b", "c d", "e f"])
    backend = FakeBackend()
    manifest = generate_responses(str(tmp_path / "p.jsonl"), out, teacher="T", cfg=GenerateConfig(), backend=backend)
    assert backend.calls == [["q0002"]] and manifest["records"] == 3


def test_other_settings_on_a_partial_output_are_refused_and_nothing_is_lost(tmp_path):
    write_prompts(tmp_path / "p.jsonl", ["a b", "c d"])
    out = str(tmp_path / "o")
    generate_responses(str(tmp_path / "p.jsonl"), out, teacher="T", cfg=GenerateConfig(), backend=FakeBackend())
    before = sorted(os.listdir(out))
    with pytest.raises(DataError, match=r"other settings .*temperature"):
        generate_responses(
            str(tmp_path / "p.jsonl"), out, teacher="T", cfg=GenerateConfig(temperature=1.0), backend=FakeBackend()
        )
    with pytest.raises(DataError, match=r"other settings .*teacher_id"):
        generate_responses(
            str(tmp_path / "p.jsonl"), out, teacher="T", teacher_id="other", cfg=GenerateConfig(), backend=FakeBackend()
        )
    assert sorted(os.listdir(out)) == before  # manifest of the finished run still there


def test_responses_for_prompts_no_longer_there_are_refused(tmp_path):
    write_prompts(tmp_path / "p.jsonl", ["a b", "c d"])
    out = str(tmp_path / "o")
    generate_responses(str(tmp_path / "p.jsonl"), out, teacher="T", cfg=GenerateConfig(), backend=FakeBackend())
    write_prompts(tmp_path / "p.jsonl", ["c d"], with_ids=False)
    with pytest.raises(DataError, match="not in"):
        generate_responses(str(tmp_path / "p.jsonl"), out, teacher="T", cfg=GenerateConfig(), backend=FakeBackend())


def test_object_store_uris(tmp_path):
    """The same code path as s3:// (fsspec, remote atomic writes) on fsspec's in-memory store."""
    fs = fsspec.filesystem("memory")
    with fs.open("/gen-test/prompts.jsonl", "w") as f:
        f.write("\n".join(json.dumps({"id": f"m{i}", "prompt": f"w{i} y"}) for i in range(7)) + "\n")
    out = "memory://gen-test/out"
    with pytest.raises(RuntimeError):
        generate_responses(
            "memory://gen-test/prompts.jsonl",
            out,
            teacher="T",
            cfg=GenerateConfig(shard_size=3),
            backend=FakeBackend(crash_after=1),
        )
    manifest = generate_responses(
        "memory://gen-test/prompts.jsonl", out, teacher="T", cfg=GenerateConfig(shard_size=3), backend=FakeBackend()
    )
    assert manifest["records"] == 7 and manifest["shards"] == [
        "part-00000.jsonl",
        "part-00001.jsonl",
        "part-00002.jsonl",
    ]
    assert io.read_manifest(out)["records_sha256"] == io.records_sha256(read_responses(out))
    fs.rm("/gen-test", recursive=True)


# ----------------------------------------------------------------------------------------------
# overlong prompts


@pytest.mark.parametrize("policy", ["skip", "truncate", "error"])
def test_overlong_prompts(tmp_path, policy):
    # window 6 tokens = template (2) + 4 words
    write_prompts(tmp_path / "p.jsonl", ["a b c", "a b c d e f g h", "x y"])
    cfg = GenerateConfig(overlong=policy)
    out = tmp_path / "o"
    if policy == "error":
        with pytest.raises(DataError, match=r"1 prompt.* longer than the 6-token prompt window .*'q0001'"):
            generate_responses(str(tmp_path / "p.jsonl"), str(out), teacher="T", cfg=cfg, backend=FakeBackend(window=6))
        assert not out.exists()
        return
    manifest = generate_responses(
        str(tmp_path / "p.jsonl"), str(out), teacher="T", cfg=cfg, backend=FakeBackend(window=6)
    )
    records = {r["id"]: r for r in read_responses(str(out))}
    assert manifest["prompts"]["overlong"] == 1
    if policy == "skip":
        assert set(records) == {"q0000", "q0002"} and manifest["prompts"]["overlong_skipped"] == 1
    else:
        assert set(records) == {"q0000", "q0001", "q0002"} and manifest["prompts"]["overlong_truncated"] == 1
        assert records["q0001"]["prompt"] == "a b c d e f g h"  # the record keeps the original prompt
        assert records["q0001"]["prompt_tokens"] <= 6 and records["q0001"]["response"].startswith("rationale : e ")


def test_all_prompts_overlong_is_an_error(tmp_path):
    write_prompts(tmp_path / "p.jsonl", ["a b c d e f g h"])
    with pytest.raises(DataError, match="no prompts left"):
        generate_responses(
            str(tmp_path / "p.jsonl"),
            str(tmp_path / "o"),
            teacher="T",
            cfg=GenerateConfig(),
            backend=FakeBackend(window=4),
        )


def test_max_prompt_tokens_tightens_the_window(tmp_path):
    write_prompts(tmp_path / "p.jsonl", ["a b c", "a b c d e f g h"])
    manifest = generate_responses(
        str(tmp_path / "p.jsonl"),
        str(tmp_path / "o"),
        teacher="T",
        cfg=GenerateConfig(max_prompt_tokens=5),
        backend=FakeBackend(window=100),
    )
    assert manifest["records"] == 1 and manifest["prompts"]["overlong_skipped"] == 1


def test_backend_contract_types():
    request = GenerationRequest(PreparedPrompt("k", "m"), (0, 1))
    assert Sampling(4).greedy and not Sampling(4, temperature=0.5).greedy
    assert request.prompt.num_tokens is None
