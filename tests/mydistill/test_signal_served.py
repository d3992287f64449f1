"""The signal stage against a served teacher: the project's server (``mydistill.generation.serve``) on
127.0.0.1 scores the mix through ``/v1/completions``; the store must equal the locally computed one,
and every bad answer (no log-probs, too few, another tokenization, HTTP errors, another model) is a
clear error or a counted refusal, never a half-written store."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from mydistill import io
from mydistill.generation import APIError
from mydistill.signal import SignalConfig, SignalStore, compute_teacher_signal
from mydistill.signal.served import RecordsRefused, compute_served_signal
from mydistill.signal.served_client import ServedTeacherError
from mydistill.signal.served_probe import ProbeMismatch

from tests.mydistill import generation_fixtures as fx

K = 16


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from mydistill.demo.tokenizer import build_tokenizer
    from tests.conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("served-teacher"), build_tokenizer(), seed=3)


@pytest.fixture(scope="module")
def server(teacher):
    proc = fx.ServerProcess(teacher, "--model-name", "tiny-teacher", "--dtype", "float32", "--enable-admin", "--max-logprobs", "32")
    yield proc
    proc.close()


@pytest.fixture
def faults(server):
    def configure(statuses=(), retry_after=None, scoring=None):
        httpx.post(
            f"{server.base_url}/admin/faults", json={"statuses": list(statuses), "retry_after": retry_after, "scoring": scoring}
        ).raise_for_status()

    yield configure
    configure()


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    from mydistill.demo.task import make_examples

    rows = [{"prompt": e["prompt"], "response": e["answer"]} for e in make_examples(20, seed=6)]
    uri = str(tmp_path_factory.mktemp("served-mix") / "train.jsonl")
    io.write_records(uri, rows + rows[:5])  # upsampled copies share one entry
    return uri


def served_cfg(server, **kw) -> SignalConfig:
    return SignalConfig(**{"backend": "openai", "api_base": server.api_base, "k": K, "mode": "topk", "api_shard_size": 8,
                           "backoff_s": 0.01, "max_retries": 2, **kw})


def assert_same_store(served_uri, local_uri, atol=1e-4):
    served, local = SignalStore(served_uri), SignalStore(local_uri)
    assert sorted(served.keys()) == sorted(local.keys()) and len(served) == 20
    codes_differ = 0
    for key in local.keys():
        a, b = served.get(key), local.get(key)
        assert np.array_equal(a.token_ids, b.token_ids)
        # the 8-bit codes round the same values the same way, unless a value sits on a code boundary
        close = np.isclose(a.log_probs, b.log_probs, atol=atol, rtol=0)
        codes_differ += int((~close).sum())
        assert np.allclose(a.log_probs, b.log_probs, atol=0.03)
        assert np.allclose(a.residual, b.residual, atol=1e-3)
    return codes_differ


@pytest.mark.parametrize(
    "mode,prompt", [("echo", "text"), ("prompt_logprobs", "text"), ("echo", "token_ids"), ("prompt_logprobs", "token_ids")]
)
def test_the_served_store_equals_the_local_store(server, teacher, mix, tmp_path, mode, prompt):
    local = str(tmp_path / "local")
    compute_teacher_signal(mix, teacher, local, cfg=SignalConfig(k=K, mode="topk", temperature=1.0, device="cpu"), max_length=48)
    served = str(tmp_path / "served")
    manifest = compute_served_signal(
        mix, teacher, served, max_length=48,
        # token-id prompts also go several to a request (a list prompt; choices matched by index)
        cfg=served_cfg(server, logprobs_mode=mode, api_prompt=prompt, concurrency=3, api_batch_size=3 if prompt == "token_ids" else 1),
        temperature=1.0,
    )
    assert manifest["counts"]["examples"] == 20 and len(manifest["shards"]) == 3
    assert manifest["teacher"]["model"] == "tiny-teacher" and manifest["teacher"]["probe"]["top_logprobs"]
    assert manifest["temperature"] == 1.0 and manifest["mode"] == "topk" and manifest["slots"] == K
    assert not io.exists(io.join(served, "progress.json"))
    assert assert_same_store(served, local) == 0


def test_served_rows_equal_the_teachers_top_k_to_1e_4(server, teacher, mix):
    """Before the 8-bit encoding: the served top-k log-probs and residuals are the teacher's own."""
    import torch

    from mydistill.models import load_model, load_tokenizer
    from mydistill.signal.served import served_rows
    from mydistill.signal.served_client import CompletionsScorer
    from mydistill.tokenization import format_prompt, format_response, tokenize_example

    tok, model = load_tokenizer(teacher), load_model(teacher, dtype="float32")
    cfg = served_cfg(server)
    scorer = CompletionsScorer(cfg, tokenizer=tok)
    scorer.served_model()
    records = io.read_records(mix)[:4]
    texts = [format_prompt(tok, r["prompt"]) + format_response(tok, r["prompt"], r["response"]) for r in records]
    for record, answer in zip(records, scorer.score(texts, add_special_tokens=False, temperature=1.0), strict=True):
        ex = tokenize_example(tok, record["prompt"], record["response"], 48)
        ids, lps, residual = served_rows(answer, ex.input_ids, ex.labels, K)
        with torch.no_grad():
            log_p = torch.log_softmax(model(torch.tensor([ex.input_ids])).logits[0].float(), -1)
        rows = [j - 1 for j in range(1, len(ex.input_ids)) if ex.labels[j] != -100]
        top_lp, top_ids = log_p[rows].topk(K, -1)
        assert np.array_equal(np.sort(ids, 1), np.sort(top_ids.numpy(), 1))
        assert np.allclose(np.sort(lps, 1), np.sort(top_lp.numpy(), 1), atol=1e-4)
        assert np.allclose(residual, 1 - top_lp.exp().sum(-1).numpy(), atol=1e-4)


def test_the_applied_temperature_is_measured_and_recorded(server, teacher, mix, tmp_path):
    # raw log-probs (vLLM's default): asked at 2, the server applies 1, and the store says so
    manifest = compute_served_signal(mix, teacher, str(tmp_path / "raw"), cfg=served_cfg(server), max_length=48, temperature=2.0)
    assert manifest["temperature"] == 1.0 and manifest["requested_temperature"] == 2.0
    assert manifest["teacher"]["probe"]["temperature_applied"] == 1.0
    # a server that applies the temperature (vLLM --logprobs-mode processed_logprobs): exact at the loss's T
    processed = fx.ServerProcess(teacher, "--model-name", "tiny-teacher", "--dtype", "float32", "--logprobs-mode", "processed")
    try:
        manifest = compute_served_signal(
            mix, teacher, str(tmp_path / "t2"), cfg=served_cfg(processed), max_length=48, temperature=2.0
        )
    finally:
        processed.close()
    assert manifest["temperature"] == 2.0
    local = str(tmp_path / "local")
    compute_teacher_signal(mix, teacher, local, cfg=SignalConfig(k=K, mode="topk", temperature=2.0, device="cpu"), max_length=48)
    assert assert_same_store(str(tmp_path / "t2"), local) == 0


# ----------------------------------------------------------------------------------------------
# bad answers


@pytest.mark.parametrize(
    "fault,message",
    [
        ("no_logprobs", "returned no log-probs"),
        ("fewer_logprobs", f"only {K - 1} log-probs per position, signal.k is {K}"),
    ],
)
def test_an_endpoint_without_enough_log_probs_is_a_clear_error(server, teacher, mix, tmp_path, faults, fault, message):
    faults(scoring=fault)
    for mode in ("echo", "prompt_logprobs"):
        with pytest.raises(ServedTeacherError, match=message):
            compute_served_signal(mix, teacher, str(tmp_path / mode), cfg=served_cfg(server, logprobs_mode=mode), max_length=48, temperature=1.0)
        assert not io.exists(io.join(str(tmp_path / mode), "manifest.json"))


def test_k_over_the_servers_cap_names_the_flag(server, teacher, mix, tmp_path):
    with pytest.raises(ServedTeacherError, match="--max-logprobs 40 .*set signal.k to at most 32"):
        compute_served_signal(mix, teacher, str(tmp_path / "s"), cfg=served_cfg(server, k=40), max_length=48, temperature=1.0)


def test_records_tokenized_differently_are_refused_counted_and_named(server, teacher, mix, tmp_path, faults):
    faults(scoring="extra_bos")  # the server reads a BOS the student's tokens do not have
    out = str(tmp_path / "s")
    with pytest.raises(RecordsRefused, match=r"for 20 of 20 distinct examples cannot be stored \(20 misaligned\).*record 1 "):
        compute_served_signal(mix, teacher, out, cfg=served_cfg(server), max_length=48, temperature=1.0)
    assert not io.exists(io.join(out, "manifest.json"))
    with pytest.raises(io.DataError, match="manifest.json missing"):
        SignalStore(out)


def test_retries_honour_retry_after_and_a_dead_server_stops_cleanly(server, teacher, mix, tmp_path, faults):
    faults([429, 500], retry_after=0.3)
    manifest = compute_served_signal(mix, teacher, str(tmp_path / "ok"), cfg=served_cfg(server), max_length=48, temperature=1.0)
    assert manifest["counts"]["examples"] == 20
    attempts = [a for a in httpx.get(f"{server.base_url}/admin/stats").json()["attempts"].values() if len(a) == 3]
    assert attempts and all(a[1] - a[0] >= 0.25 for a in attempts)  # waited for Retry-After

    faults([500, 500, 500, 500])
    out = str(tmp_path / "down")
    with pytest.raises(APIError, match="failed after 3 attempts.*re-run to resume"):
        compute_served_signal(mix, teacher, out, cfg=served_cfg(server), max_length=48, temperature=1.0)
    assert not io.exists(io.join(out, "manifest.json"))


def test_a_crashed_run_resumes_with_the_missing_shards_only(server, teacher, mix, tmp_path, faults, monkeypatch):
    from mydistill.signal import served_client

    out = str(tmp_path / "s")
    real, calls = served_client.CompletionsScorer.score, []

    def crash_on_second_shard(self, prompts, **kw):
        calls.append(len(prompts))
        if len(calls) == 3:  # the probe, shard 0, then shard 1
            raise KeyboardInterrupt("killed")
        return real(self, prompts, **kw)

    monkeypatch.setattr(served_client.CompletionsScorer, "score", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        compute_served_signal(mix, teacher, out, cfg=served_cfg(server), max_length=48, temperature=1.0)
    assert io.exists(io.join(out, "progress.json")) and not io.exists(io.join(out, "manifest.json"))

    calls.clear()
    monkeypatch.setattr(served_client.CompletionsScorer, "score", lambda self, prompts, **kw: (calls.append(len(prompts)), real(self, prompts, **kw))[1])
    manifest = compute_served_signal(mix, teacher, out, cfg=served_cfg(server), max_length=48, temperature=1.0)
    assert calls == [1, 8, 4]  # the probe, then shards 1 and 2 (shard 0 was committed)
    assert manifest["counts"]["examples"] == 20 and len(SignalStore(out)) == 20

    # a model swapped behind the same URL: the finished store is refused on a re-run
    faults(scoring="perturb")
    with pytest.raises(ProbeMismatch, match="not the model this store was made with.*moved by up to"):
        compute_served_signal(mix, teacher, out, cfg=served_cfg(server), max_length=48, temperature=1.0)


def test_a_changed_probe_stops_a_resume(server, teacher, mix, tmp_path, faults, monkeypatch):
    from mydistill.signal import served_client

    out = str(tmp_path / "s")
    real, calls = served_client.CompletionsScorer.score, []

    def crash(self, prompts, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(self, prompts, **kw)

    monkeypatch.setattr(served_client.CompletionsScorer, "score", crash)
    with pytest.raises(KeyboardInterrupt):
        compute_served_signal(mix, teacher, out, cfg=served_cfg(server), max_length=48, temperature=1.0)
    monkeypatch.setattr(served_client.CompletionsScorer, "score", real)
    faults(scoring="perturb")
    with pytest.raises(ProbeMismatch, match="progress.json: the served teacher is not the model this store was begun with"):
        compute_served_signal(mix, teacher, out, cfg=served_cfg(server), max_length=48, temperature=1.0)
    assert not io.exists(io.join(out, "manifest.json"))


def test_the_config_names_what_a_served_teacher_needs():
    with pytest.raises(ValueError, match="signal.api_base is required"):
        SignalConfig(backend="openai")
    with pytest.raises(ValueError, match="returns only its top-k"):
        SignalConfig(backend="openai", api_base="http://h/v1", mode="sampled")
    with pytest.raises(ValueError, match="NAME of an environment variable"):
        SignalConfig(backend="openai", api_base="http://h/v1", api_key_env="sk-123")
    cfg = SignalConfig(backend="openai", api_base="http://user:pw@h/v1")
    assert cfg.resolved_mode("forward_kl") == "topk" and "pw" not in str(cfg.model_dump())


def test_the_signal_stage_with_a_served_teacher_feeds_the_distill_stage(server, teacher, tmp_path):
    """The pipeline's signal stage (signal.backend: openai) writes the store; the distill job trains from it."""
    from mydistill.config import load_config
    from mydistill.demo.task import make_examples
    from mydistill.mix import TRAIN_FILE, VAL_FILE
    from mydistill.pipeline.plan import make_plan
    from mydistill.stage_functions import teacher_signal, train_job
    from mydistill.train import run_training

    cfg = load_config("demo", [
        f"work_dir={tmp_path}", f"teacher.uri={teacher}", "signal.enabled=true", "signal.backend=openai",
        f"signal.api_base={server.api_base}", f"signal.k={K}", "distill.max_length=48", "distill.steps=4",
        "distill.batch_size=8", "distill.eval_every=4", "distill.log_every=2", "distill.warmup_steps=1",
    ])
    plan = make_plan(cfg)
    rows = [{"prompt": e["prompt"], "response": e["answer"], "source": "teacher"} for e in make_examples(16, seed=9)]
    io.write_records(io.join(plan.mix_uri, TRAIN_FILE), rows)
    io.write_records(io.join(plan.mix_uri, VAL_FILE), rows[:4])
    io.write_manifest(plan.mix_uri, stage="mix", inputs={})
    manifest = teacher_signal(cfg, plan)
    assert manifest["backend"] == "openai" and manifest["mode"] == "topk" and manifest["counts"]["examples"] == 16
    assert manifest["temperature"] == 1.0 and manifest["requested_temperature"] == cfg.distill.loss.temperature
    assert teacher_signal(cfg, plan)["inputs_sha256"] == manifest["inputs_sha256"]  # a re-run reuses it

    job = train_job(cfg, plan, "distill")
    assert job.signal_uris == [plan.signal_uri]
    trained = run_training(job)
    assert trained["inputs"]["signal_uris"] == [plan.signal_uri] and trained["history"][-1]["kd"] > 0


def test_a_record_the_server_rejects_is_refused_by_number(server, teacher, mix, tmp_path):
    rows = io.read_records(mix)
    long = {"prompt": rows[0]["prompt"], "response": " ".join(["abcdefgh"] * 20)}  # past the teacher's 64 positions
    data = str(tmp_path / "train.jsonl")
    io.write_records(data, rows[:6] + [long])
    with pytest.raises(RecordsRefused, match=r"for 1 of 7 distinct examples cannot be stored \(1 HTTP 400\), e\.g\. record 7 .*maximum context length"):
        compute_served_signal(data, teacher, str(tmp_path / "s"), cfg=served_cfg(server), max_length=200, temperature=1.0)


def test_a_refused_key_or_a_wrong_url_stops_the_stage_with_what_to_check(teacher, mix, tmp_path, monkeypatch):
    monkeypatch.setenv("MYDISTILL_TEST_SIGNAL_KEY", "sk-secret-123")

    def answer(status):
        return httpx.MockTransport(lambda request: httpx.Response(status, json={"error": {"message": "nope"}}))

    cfg = SignalConfig(backend="openai", api_base="http://teacher.invalid/v1", api_key_env="MYDISTILL_TEST_SIGNAL_KEY", k=K)
    with pytest.raises(APIError, match="MYDISTILL_TEST_SIGNAL_KEY \\(it is set\\)") as error:
        compute_served_signal(mix, teacher, str(tmp_path / "s"), cfg=cfg, max_length=48, temperature=1.0, transport=answer(401))
    assert "sk-secret-123" not in str(error.value)
    with pytest.raises(APIError, match="Check signal.api_base"):
        compute_served_signal(mix, teacher, str(tmp_path / "s"), cfg=cfg, max_length=48, temperature=1.0, transport=answer(404))


def test_the_plan_names_a_served_store_apart_and_leaves_local_stores_where_they_were(tmp_path):
    from mydistill.config import load_config
    from mydistill.pipeline.plan import _signal_content, make_plan

    local = load_config("demo", [f"work_dir={tmp_path}", "signal.enabled=true"])
    served = load_config("demo", [f"work_dir={tmp_path}", "signal.enabled=true", "signal.backend=openai",
                                  "signal.api_base=http://teacher:8000/v1"])
    other = load_config("demo", [f"work_dir={tmp_path}", "signal.enabled=true", "signal.backend=openai",
                                 "signal.api_base=http://teacher:8000/v1", "signal.api_model=teacher-b"])
    assert "backend" not in _signal_content(local)  # a local store's address is unchanged by this feature
    uris = {make_plan(c).signal_uri for c in (local, served, other)}
    assert len(uris) == 3 and make_plan(served).mix_uri == make_plan(local).mix_uri
    assert _signal_content(served)["mode"] == "topk"  # auto: a server lists no tail to sample
