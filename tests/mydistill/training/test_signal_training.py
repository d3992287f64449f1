"""The teacher signal inside the distill stage: stores, on-policy batches, other tokenizers, the plan."""

import math

import pytest

from mydistill import io
from mydistill.config import DistillConfig, load_config
from mydistill.training.cross_tokenizer import TokenizerMismatch
from mydistill.models import build_model, load_tokenizer
from mydistill.signal import SignalConfig, StoreMismatch, compute_teacher_signal
from mydistill.train import TrainJob, run_training

from tests.conftest import TINY_ARCH


@pytest.fixture
def mix_data(tmp_path):
    from mydistill.demo.task import make_examples

    rows = [{"id": e["id"], "prompt": e["prompt"], "response": e["answer"], "source": "teacher"} for e in make_examples(48, seed=4)]
    uri = str(tmp_path / "train.jsonl")
    io.write_records(uri, rows + rows[:16])
    return uri


def distill_job(tmp_path, data, tokenizer_dir, teacher_dir, *, name="out", signal_uris=(), **train):
    cfg = DistillConfig(**{"steps": 6, "batch_size": 8, "warmup_steps": 1, "log_every": 3, "eval_every": 6, **train})
    return TrainJob(
        stage="distill", data_uri=data, val_uri=data, output_uri=str(tmp_path / name), tokenizer_uri=tokenizer_dir,
        teacher_uri=teacher_dir, signal_uris=list(signal_uris), train=cfg.model_dump(), arch=TINY_ARCH,
    )


def test_distill_from_a_store_never_loads_the_teacher(tmp_path, mix_data, tiny_model_dir, monkeypatch):
    import mydistill.training.teachers as teachers_module

    store = str(tmp_path / "signal")
    compute_teacher_signal(mix_data, tiny_model_dir, store, cfg=SignalConfig(k=16, sampled_tokens=8, device="cpu"), max_length=48)
    real_load = teachers_module.load_model

    def no_teacher(uri, **kwargs):
        assert uri != tiny_model_dir, "the teacher was loaded although a store was given"
        return real_load(uri, **kwargs)

    monkeypatch.setattr(teachers_module, "load_model", no_teacher)
    manifest = run_training(distill_job(tmp_path, mix_data, tiny_model_dir, tiny_model_dir, signal_uris=[store]))
    assert manifest["inputs"]["signal_uris"] == [store]
    last = manifest["history"][-1]
    assert last["kd"] > 0 and 0 <= last["teacher_agreement"] <= 1


def test_a_store_for_other_data_stops_the_run_before_training(tmp_path, mix_data, tiny_model_dir):
    other = str(tmp_path / "other.jsonl")
    io.write_records(other, io.read_records(mix_data)[:20])
    store = str(tmp_path / "signal")
    compute_teacher_signal(other, tiny_model_dir, store, cfg=SignalConfig(k=8, sampled_tokens=4, device="cpu"), max_length=48)
    with pytest.raises(StoreMismatch, match="other training data"):
        run_training(distill_job(tmp_path, mix_data, tiny_model_dir, tiny_model_dir, signal_uris=[store]))
    assert not (tmp_path / "out").exists()


def test_on_policy_batches_in_the_trainer(tmp_path, mix_data, tiny_model_dir):
    job = distill_job(
        tmp_path, mix_data, tiny_model_dir, tiny_model_dir,
        on_policy={"fraction": 0.5, "max_new_tokens": 4, "divergence": "generalized_jsd"},
    )
    manifest = run_training(job)
    sampled = manifest["history"][-1]["on_policy_batches"]
    assert 1 <= sampled <= 5  # λ = 0.5 over 6 steps, seeded


def other_teacher(tmp_path):
    from tests.mydistill.training.test_cross_tokenizer import merged_tokenizer

    path = tmp_path / "other-teacher"
    tok = merged_tokenizer()
    build_model(TINY_ARCH, tok, seed=5).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_teacher_with_another_tokenizer_needs_a_method(tmp_path, mix_data, tiny_model_dir):
    teacher = other_teacher(tmp_path)
    with pytest.raises(TokenizerMismatch, match="distill.cross_tokenizer.method"):
        run_training(distill_job(tmp_path, mix_data, tiny_model_dir, teacher))
    assert not (tmp_path / "out").exists()

    manifest = run_training(distill_job(tmp_path, mix_data, tiny_model_dir, teacher, cross_tokenizer={"method": "uld"}))
    last = manifest["history"][-1]
    assert last["uld"] > 0 and last["uld_positions"] > 0 and last["loss"] == pytest.approx(last["ce"] + last["uld"], rel=1e-4)

    manifest = run_training(
        distill_job(tmp_path, mix_data, tiny_model_dir, teacher, name="seq", cross_tokenizer={"method": "sequence"})
    )
    assert manifest["history"][-1]["kd"] == 0.0  # cross-entropy on the teacher's text only


def test_the_plan_puts_the_signal_stage_between_mix_and_distill(tmp_path):
    off = load_config("demo", [f"work_dir={tmp_path}"])
    on = load_config("demo", [f"work_dir={tmp_path}", "signal.enabled=true", "signal.k=48"])
    from mydistill.pipeline.plan import make_plan
    from mydistill.stage_functions import train_job

    plan_off, plan_on = make_plan(off), make_plan(on)
    assert plan_off.signal_uri is None and plan_on.signal_uri.startswith(f"{tmp_path}/signal-")
    assert plan_on.mix_uri == plan_off.mix_uri and plan_on.distill_uri != plan_off.distill_uri
    # only what the store holds names it: the batch size of the teacher pass does not
    again = make_plan(load_config("demo", [f"work_dir={tmp_path}", "signal.enabled=true", "signal.k=48", "signal.batch_size=7"]))
    assert again.signal_uri == plan_on.signal_uri
    assert train_job(on, plan_on, "distill").signal_uris == [plan_on.signal_uri]
    assert train_job(off, plan_off, "distill").signal_uris == []
    baseline = train_job(on, plan_on, "baseline")
    assert "on_policy" not in baseline.train and "cross_tokenizer" not in baseline.train


def test_the_signal_stage_writes_the_store_the_distill_job_reads(tmp_path, tiny_model_dir):
    from mydistill.mix import TRAIN_FILE
    from mydistill.demo.task import make_examples
    from mydistill.pipeline.plan import make_plan
    from mydistill.stage_functions import teacher_signal

    cfg = load_config("demo", [f"work_dir={tmp_path}", f"teacher.uri={tiny_model_dir}", "signal.enabled=true", "signal.k=12", "signal.sampled_tokens=4"])
    plan = make_plan(cfg)
    rows = [{"id": e["id"], "prompt": e["prompt"], "response": e["answer"], "source": "teacher"} for e in make_examples(12, seed=8)]
    io.write_records(io.join(plan.mix_uri, TRAIN_FILE), rows)
    io.write_manifest(plan.mix_uri, stage="mix", inputs={})
    manifest = teacher_signal(cfg, plan)
    # the default mode 'auto' with the default forward_kl loss: the manifest names the concrete mode,
    # and its k = 12 entries are 8 exact top tokens (the manifest's k) + 4 sampled ones
    assert manifest["counts"]["examples"] == 12 and manifest["k"] == 8
    assert cfg.signal.mode == "auto" and manifest["mode"] == "sampled" and manifest["slots"] == 8 + 4
    assert manifest["tokenizer_sha256"] and manifest["teacher"]["id"] == plan.teacher_id
    assert load_tokenizer(tiny_model_dir) is not None


def test_auto_mode_is_sampled_for_forward_kl_and_top_k_otherwise(tmp_path):
    from mydistill.pipeline.plan import make_plan, signal_mode

    assert SignalConfig().mode == "auto"
    assert SignalConfig().resolved_mode("forward_kl") == "sampled"
    assert SignalConfig().resolved_mode("generalized_jsd") == "topk"
    assert SignalConfig(mode="topk").resolved_mode("forward_kl") == "topk"

    def cfg(*extra):
        return load_config("demo", [f"work_dir={tmp_path}", "signal.enabled=true", *extra])

    assert signal_mode(cfg()) == "sampled"
    assert signal_mode(cfg("distill.loss.divergence=reverse_kl")) == "topk"
    # a store is named by what it holds: 'auto' and the mode it stands for are the same store
    assert make_plan(cfg()).signal_uri == make_plan(cfg("signal.mode=sampled")).signal_uri
    assert make_plan(cfg("distill.loss.divergence=reverse_kl")).signal_uri == make_plan(
        cfg("distill.loss.divergence=reverse_kl", "signal.mode=topk")
    ).signal_uri
    assert make_plan(cfg()).signal_uri != make_plan(cfg("signal.mode=topk")).signal_uri


def test_signal_config_errors_name_the_fields():
    from mydistill.config import ConfigError

    with pytest.raises(ConfigError, match="unbiased only for distill.loss.divergence: forward_kl"):
        load_config("demo", ["signal.enabled=true", "signal.mode=sampled", "distill.loss.divergence=reverse_kl"])
    with pytest.raises(ConfigError, match="2 weights for 1 teacher-signal stores"):
        load_config("demo", ["signal.enabled=true", "distill.loss.teacher_weights=[1, 2]"])
    with pytest.raises(ConfigError, match="one shared tokenizer"):
        load_config("demo", ["signal.enabled=true", "distill.cross_tokenizer.method=uld"])
    with pytest.raises(ConfigError, match="cannot be combined with cross_tokenizer.method"):
        load_config("demo", ["distill.on_policy.fraction=0.5", "distill.cross_tokenizer.method=sequence"])
    ok = load_config("demo", ["signal.enabled=true", "signal.extra_uris=[s3://b/other]", "distill.loss.teacher_weights=[2, 1]"])
    assert ok.signal.extra_uris == ["s3://b/other"]


@pytest.mark.slow
def test_store_and_on_policy_batches_under_zero3_on_two_processes(tmp_path, mix_data, tiny_model_dir):
    """A store read by every rank, and student sampling while ZeRO-3 shards the student (synced generate)."""
    import os

    from mydistill.training.launch import launch_training

    store = str(tmp_path / "signal")
    compute_teacher_signal(mix_data, tiny_model_dir, store, cfg=SignalConfig(k=16, sampled_tokens=8, device="cpu"), max_length=48)
    zero3 = os.path.join(os.path.dirname(__file__), "..", "..", "..", "deploy", "deepspeed", "zero3.json")
    job = distill_job(
        tmp_path, mix_data, tiny_model_dir, tiny_model_dir, signal_uris=[store], launcher="torchrun", num_processes=2,
        threads=1, deepspeed=os.path.abspath(zero3), on_policy={"fraction": 0.5, "max_new_tokens": 4},
    )
    manifest = launch_training(job)
    assert manifest["world_size"] == 2 and manifest["deepspeed"] is True
    last = manifest["history"][-1]
    assert last["kd"] > 0 and 1 <= last["on_policy_batches"] <= 5


def test_k_counts_exact_and_sampled_entries_together():
    from mydistill.config import ConfigError

    assert SignalConfig().exact_tokens("sampled") == 32 and SignalConfig().exact_tokens("topk") == 64
    with pytest.raises(ValueError, match=r"signal.sampled_tokens \(32\) must be below signal.k \(16\)"):
        SignalConfig(k=16, mode="sampled")
    SignalConfig(k=16, mode="topk")  # top-k draws nothing
    with pytest.raises(ConfigError, match=r"signal.sampled_tokens \(32\) must be below signal.k \(32\)"):
        load_config("demo", ["signal.enabled=true", "signal.k=32"])  # auto + forward_kl: sampled
    load_config("demo", ["signal.enabled=true", "signal.k=32", "distill.loss.divergence=reverse_kl"])  # auto: top-k


def test_on_policy_batches_with_layer_wise_distillation(tmp_path, mix_data, tiny_model_dir):
    """Student-sampled batches also carry both models' per-layer states for the hidden-state loss."""
    job = distill_job(
        tmp_path, mix_data, tiny_model_dir, tiny_model_dir, on_policy={"fraction": 1.0, "max_new_tokens": 4},
        loss={"hidden": {"weight": 1.0, "layer_map": "uniform", "loss": "mse"}},
    )
    history = run_training(job)["history"]
    assert history[-1]["on_policy_batches"] == 6  # every batch sampled from the student
    assert all(h["hidden"] > 0 and math.isfinite(h["loss"]) for h in history)
