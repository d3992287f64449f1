"""The Hugging Face backend on tiny local teachers: batched == plain per-prompt generate, sampling,
out-of-memory splitting, truncation, and the whole stage (rationales, resume) on a real model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from mydistill.generation import (  # noqa: E402
    GenerateConfig,
    GenerationRequest,
    HFBackend,
    Sampling,
    TeacherBackend,
    generate_responses,
    read_responses,
)

from tests.mydistill import generation_fixtures as fx  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with fx.torch_threads(1):
        yield


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory):
    return fx.build_random_teacher(tmp_path_factory.getbasetemp() / "gen-random-teacher")


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory):
    return fx.build_trained_teacher(tmp_path_factory.getbasetemp() / "gen-trained-teacher")


@pytest.fixture(scope="module")
def random_backend(random_teacher):
    return HFBackend(random_teacher, batch_size=4, device="cpu")


def _prompts(n: int, seed: int = 0) -> list[str]:
    return fx.teacher_prompts(n, seed)  # prompts the trained teacher answers right


def _requests(backend: TeacherBackend, prompts: list[str], samples: tuple[int, ...] = (0,)) -> list[GenerationRequest]:
    return [GenerationRequest(backend.prepare(f"k{i}", p), samples) for i, p in enumerate(prompts)]


# ----------------------------------------------------------------------------------------------
# the backend


def test_batched_generation_matches_one_generate_call_per_prompt(random_backend):
    """Left padding, length sorting and batching must not change a single greedy token."""
    prompts = _prompts(11)
    requests = _requests(random_backend, prompts)
    assert len({len(r.prompt.token_ids) for r in requests}) > 3  # really mixed lengths
    progress = []
    batched = random_backend.generate(requests, Sampling(max_new_tokens=12), progress.append)
    assert sum(progress) == len(prompts)

    model, tokenizer = random_backend.model, random_backend.tokenizer
    for request, (completion,) in zip(requests, batched, strict=True):
        ids = torch.tensor([request.prompt.token_ids])
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0
        )
        new = out[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id) + 1]
        assert completion.text == tokenizer.decode(new, skip_special_tokens=True)
        assert completion.completion_tokens == len(new)
        assert completion.prompt_tokens == len(request.prompt.token_ids)
        assert completion.finish_reason == ("stop" if new[-1] == tokenizer.eos_token_id else "length")


def test_sampling_is_seeded_and_gives_every_sample(random_backend):
    requests = _requests(random_backend, _prompts(3), samples=(0, 1, 2))
    sampling = Sampling(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=3)
    first = random_backend.generate(requests, sampling)
    assert [len(c) for c in first] == [3, 3, 3]
    assert len({c.text for c in first[0]}) > 1  # samples differ
    assert [[c.text for c in r] for r in random_backend.generate(requests, sampling)] == [
        [c.text for c in r] for r in first
    ]
    other = random_backend.generate(requests, Sampling(max_new_tokens=8, temperature=1.0, seed=4))
    assert [[c.text for c in r] for r in other] != [[c.text for c in r] for r in first]
    before = torch.random.get_rng_state()
    random_backend.generate(requests, sampling)
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's RNG is left alone


def test_greedy_samples_decode_once(random_backend, monkeypatch):
    rows_seen = []
    real = random_backend._generate_batch
    monkeypatch.setattr(random_backend, "_generate_batch", lambda ids, *a: rows_seen.append(len(ids)) or real(ids, *a))
    results = random_backend.generate(
        _requests(random_backend, _prompts(2), samples=(0, 1, 2)), Sampling(max_new_tokens=4)
    )
    assert sum(rows_seen) == 2 and all(len({c.text for c in r}) == 1 and len(r) == 3 for r in results)


def test_ignore_eos_generates_exactly_max_new_tokens(trained_teacher):
    backend = HFBackend(trained_teacher, device="cpu")
    ((completion,),) = backend.generate(_requests(backend, ["kite boat"]), Sampling(max_new_tokens=20, ignore_eos=True))
    assert completion.completion_tokens == 20 and completion.finish_reason == "length"


def test_prompt_without_chat_template_is_formatted_as_in_training(tmp_path):
    from mydistill.tokenization import tokenize_example

    teacher = fx.build_random_teacher(tmp_path / "plain", chat_template=False)
    backend = HFBackend(teacher)
    prompt = backend.prepare("k", "kite boat")
    assert prompt.text == "kite boat\n" and prompt.token_ids == backend.tokenizer("kite boat\n")["input_ids"]
    # exactly the prompt tokens the student is trained on
    trained = tokenize_example(backend.tokenizer, "kite boat", "x", max_length=64)
    assert trained.input_ids[: len(prompt.token_ids)] == prompt.token_ids


def test_out_of_memory_splits_the_batch(random_backend, monkeypatch):
    backend = HFBackend(model=random_backend.model, tokenizer=random_backend.tokenizer, batch_size=8)
    real = backend._generate_batch

    def limited(ids, sampling, seed):
        if len(ids) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        if any(len(i) > 16 for i in ids):  # only the long prompt
            raise RuntimeError("CUDA error: out of memory (simulated)")
        return real(ids, sampling, seed)

    monkeypatch.setattr(backend, "_generate_batch", limited)
    prompts = [*_prompts(7), "kite " + "boat " * 15]
    results = backend.generate(_requests(backend, prompts), Sampling(max_new_tokens=4))
    assert backend.batch_size == 2
    assert [r[0].finish_reason for r in results][-1] == "error" and "out of memory" in results[-1][0].error
    assert all(r[0].finish_reason != "error" for r in results[:-1])


def test_context_window_comes_from_the_model_config(random_teacher):
    assert HFBackend(random_teacher).context_window(16) == 96 - 16


# ----------------------------------------------------------------------------------------------
# the stage on a real model


def test_rationale_run_on_a_trained_teacher(trained_teacher, tmp_path):
    prompts = _prompts(20, seed=1)
    fx.write_prompts(tmp_path / "p.jsonl", prompts, answer=[p.split()[-1] for p in prompts])
    # float32: exact answers are asserted, and half precision on a GPU may flip a close one
    cfg = GenerateConfig(
        rationale=True, rationale_template="{prompt}", max_new_tokens=16, batch_size=8, shard_size=8, dtype="float32"
    )
    manifest = generate_responses(
        str(tmp_path / "p.jsonl"),
        str(tmp_path / "o"),
        teacher=trained_teacher,
        teacher_id="tiny",
        cfg=cfg,
        progress=False,
    )
    records = read_responses(str(tmp_path / "o"))
    assert manifest["status_counts"]["ok"] == 20 and len(manifest["shards"]) == 3
    for r in records:
        assert r["response"] == fx.target_response(r["prompt"])
        assert r["answer"] == r["input_answer"] == r["prompt"].split()[-1]
        assert r["rationale"] == f"the last word is {r['answer']} ."
        assert r["finish_reason"] == "stop" and r["completion_tokens"] == 12 and r["teacher_id"] == "tiny"
    truncated = generate_responses(
        str(tmp_path / "p.jsonl"),
        str(tmp_path / "o4"),
        teacher=trained_teacher,
        cfg=cfg.model_copy(update={"max_new_tokens": 4}),
        progress=False,
    )
    assert truncated["status_counts"]["truncated"] == 20 and truncated["finish_reason_counts"]["length"] == 20


class _CrashAfter(TeacherBackend):
    def __init__(self, inner: TeacherBackend, shards: int):
        self.inner, self.shards, self.name, self.formatter = inner, shards, inner.name, inner.formatter

    def context_window(self, max_new_tokens):
        return self.inner.context_window(max_new_tokens)

    def generate(self, requests, sampling, on_progress=None):
        if self.shards == 0:
            raise KeyboardInterrupt("injected")
        self.shards -= 1
        return self.inner.generate(requests, sampling, on_progress)


def test_interrupted_run_resumes_to_the_uninterrupted_result(trained_teacher, tmp_path):
    fx.write_prompts(tmp_path / "p.jsonl", _prompts(17, seed=2))
    cfg = GenerateConfig(max_new_tokens=16, batch_size=4, shard_size=5)
    backend = HFBackend(trained_teacher)
    reference = generate_responses(
        str(tmp_path / "p.jsonl"),
        str(tmp_path / "ref"),
        teacher=trained_teacher,
        cfg=cfg,
        backend=backend,
        progress=False,
    )

    out = str(tmp_path / "o")
    with pytest.raises(KeyboardInterrupt):
        generate_responses(
            str(tmp_path / "p.jsonl"),
            out,
            teacher=trained_teacher,
            cfg=cfg,
            backend=_CrashAfter(backend, 2),
            progress=False,
        )
    assert len(read_responses(out)) == 10
    manifest = generate_responses(
        str(tmp_path / "p.jsonl"), out, teacher=trained_teacher, cfg=cfg, backend=backend, progress=False
    )
    assert manifest["run"]["generated_records"] == 7
    assert manifest["records_sha256"] == reference["records_sha256"]


def test_left_truncation_keeps_the_template_and_the_end_of_the_prompt(trained_teacher, tmp_path):
    backend = HFBackend(trained_teacher)
    long_prompt = "kite " + " ".join(fx.WORDS) + " boat"
    cut = backend.truncate(backend.prepare("k", long_prompt), 8)
    # 8 tokens = <|user|> + the last 6 words + <|assistant|>
    assert cut.truncated and cut.message == " ".join([*fx.WORDS[-5:], "boat"])
    assert cut.token_ids == backend.prepare("k", cut.message).token_ids and len(cut.token_ids) == 8

    fx.write_prompts(tmp_path / "p.jsonl", [long_prompt, "lamp short kite"])
    cfg = GenerateConfig(max_prompt_tokens=8, overlong="truncate", max_new_tokens=16, dtype="float32")
    manifest = generate_responses(
        str(tmp_path / "p.jsonl"), str(tmp_path / "o"), teacher=trained_teacher, cfg=cfg, progress=False
    )
    records = {r["id"]: r for r in read_responses(str(tmp_path / "o"))}
    assert manifest["prompts"]["overlong_truncated"] == 1 and manifest["status_counts"]["ok"] == 2
    assert records["q0000"]["prompt"] == long_prompt and records["q0000"]["prompt_tokens"] == 8
    assert records["q0000"]["response"] == fx.target_response(long_prompt)  # the teacher saw the end


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_device_and_dtype_on_a_gpu(trained_teacher, tmp_path):
    backend = HFBackend(trained_teacher)
    assert backend.model.device.type == "cuda" and backend.model.dtype in (torch.bfloat16, torch.float16)
    prompts = _prompts(32, seed=3)
    fx.write_prompts(tmp_path / "p.jsonl", prompts)
    cfg = GenerateConfig(max_new_tokens=16, batch_size=16)
    manifest = generate_responses(
        str(tmp_path / "p.jsonl"),
        str(tmp_path / "o"),
        teacher=trained_teacher,
        cfg=cfg,
        backend=backend,
        progress=False,
    )
    assert manifest["records"] == 32
    right = sum(r["response"] == fx.target_response(r["prompt"]) for r in read_responses(str(tmp_path / "o")))
    assert right >= 28  # half precision may flip a close answer or two


# ----------------------------------------------------------------------------------------------
# the benchmark script (a smoke run: it prints ratios, nothing here times anything)


def test_benchmark_script_runs(random_teacher, capsys):
    spec = importlib.util.spec_from_file_location("generation_benchmark", REPO / "benchmarks" / "generation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(
        ["--teacher", random_teacher, "--prompts", "6", "--max-new-tokens", "4", "--batch-size", "4", "--threads", "1"]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("speedup=") and float(last.split("=")[1]) > 0
