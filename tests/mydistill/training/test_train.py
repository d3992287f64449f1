import os

import pytest
import torch

from mydistill import io
from mydistill.config import DistillConfig, TrainConfig
from mydistill.models import load_model
from mydistill.train import TrainingError, TrainJob, run_training

from tests.conftest import TINY_ARCH


@pytest.fixture
def task_data(tmp_path):
    from mydistill.demo.task import make_examples

    rows = [{"prompt": e["prompt"], "response": e["answer"]} for e in make_examples(64, seed=5)]
    uri = str(tmp_path / "train.jsonl")
    io.write_records(uri, rows)
    return uri


def job(tmp_path, data, tokenizer_dir, **kw):
    train = TrainConfig(
        steps=kw.pop("steps", 20), batch_size=16, lr=kw.pop("lr", 3e-3), warmup_steps=2, log_every=5, eval_every=10
    )
    return TrainJob(
        stage=kw.pop("stage", "finetune"),
        data_uri=data,
        val_uri=data,
        output_uri=str(tmp_path / "out"),
        tokenizer_uri=tokenizer_dir,
        train=kw.pop("train", train.model_dump()),
        **kw,
    )


def test_cross_entropy_training_learns_and_saves_a_loadable_model(tmp_path, task_data, tiny_model_dir):
    seen = []
    manifest = run_training(
        job(tmp_path, task_data, tiny_model_dir, arch=TINY_ARCH, steps=40), on_metrics=lambda m, s: seen.append((s, m))
    )
    history = manifest["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert {"loss", "ce", "lr", "tokens_per_s", "step_time_s", "peak_memory_mb", "val_loss"} <= set(history[-1])
    assert [s for s, _ in seen] == [5, 10, 15, 20, 25, 30, 35, 40]
    model = load_model(str(tmp_path / "out"))
    assert model.config.hidden_size == TINY_ARCH["hidden_size"]
    assert "model.safetensors" in manifest["files"] and "tokenizer.json" in manifest["files"]


def test_finished_output_is_reused(tmp_path, task_data, tiny_model_dir):
    first = run_training(job(tmp_path, task_data, tiny_model_dir, arch=TINY_ARCH, steps=5))
    assert run_training(job(tmp_path, task_data, tiny_model_dir, arch=TINY_ARCH, steps=5)) == first
    other = run_training(job(tmp_path, task_data, tiny_model_dir, arch=TINY_ARCH, steps=6))
    assert other["inputs_sha256"] != first["inputs_sha256"]


def test_distillation_from_an_online_teacher(tmp_path, task_data, tiny_model_dir):
    train = DistillConfig(steps=10, batch_size=16, warmup_steps=1, log_every=5, eval_every=5)
    manifest = run_training(
        job(
            tmp_path,
            task_data,
            tiny_model_dir,
            stage="distill",
            arch=TINY_ARCH,
            teacher_uri=tiny_model_dir,
            train=train.model_dump(),
        )
    )
    assert manifest["history"][-1]["kd"] >= 0
    assert manifest["history"][-1]["ce"] > 0


def test_teacher_with_another_vocabulary_is_refused(tmp_path, task_data, tiny_model_dir):
    from mydistill.models import VocabularyMismatch, build_model
    from tests.mydistill.test_models import other_tokenizer

    other = tmp_path / "other-teacher"
    tok = other_tokenizer()
    build_model(TINY_ARCH, tok).save_pretrained(other)
    tok.save_pretrained(other)
    train = DistillConfig(steps=2, batch_size=4).model_dump()
    with pytest.raises(VocabularyMismatch):
        run_training(
            job(
                tmp_path,
                task_data,
                tiny_model_dir,
                stage="distill",
                arch=TINY_ARCH,
                teacher_uri=str(other),
                train=train,
            )
        )
    assert not (tmp_path / "out").exists()


def poison_loss_at(monkeypatch, call: int):
    """Make the trainer's ``call``-th loss NaN (a diverging run, on demand); returns the real ``forward_loss``."""
    import mydistill.train as train_module

    real = train_module.forward_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == call:
            out = out._replace(loss=out.loss * torch.tensor(float("nan")))
        return out

    monkeypatch.setattr(train_module, "forward_loss", poisoned)
    return real


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, task_data, tiny_model_dir, monkeypatch):
    import mydistill.train as train_module

    real = poison_loss_at(monkeypatch, 5)
    the_job = job(tmp_path, task_data, tiny_model_dir, arch=TINY_ARCH, steps=10)
    the_job.train["save_every"] = 2
    with pytest.raises(TrainingError, match=r"loss is nan at step 5; stopping. The last good checkpoint \(step4\) is kept"):
        run_training(the_job)
    assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path / "out.checkpoints")) == ["latest", "step2", "step4"]

    # the run resumes from there once the cause is gone
    monkeypatch.setattr(train_module, "forward_loss", real)
    manifest = run_training(the_job)
    assert manifest["history"][-1]["step"] == 10
    assert not (tmp_path / "out.checkpoints").exists()


def test_bad_training_data_names_file_and_record(tmp_path, tiny_model_dir):
    uri = str(tmp_path / "bad.jsonl")
    io.write_records(uri, [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    with pytest.raises(io.DataError, match=r"bad.jsonl: record 2 needs 'prompt' and 'response'"):
        run_training(job(tmp_path, uri, tiny_model_dir, arch=TINY_ARCH))


def test_teacher_head_padded_beyond_the_shared_vocabulary_is_accepted(tmp_path, task_data, tiny_model_dir, demo_tokenizer):
    """Same tokenizer, teacher head with padding rows (as Qwen2.5-7B vs 0.5B): distillation works."""
    from transformers import LlamaConfig, LlamaForCausalLM

    padded = tmp_path / "padded-teacher"
    config = LlamaConfig(vocab_size=len(demo_tokenizer) + 8, pad_token_id=demo_tokenizer.pad_token_id,
                         **{k: v for k, v in TINY_ARCH.items() if k != "tie_word_embeddings"})
    LlamaForCausalLM(config).save_pretrained(padded)
    demo_tokenizer.save_pretrained(padded)
    train = DistillConfig(steps=4, batch_size=8, warmup_steps=1, log_every=2).model_dump()
    manifest = run_training(job(tmp_path, task_data, tiny_model_dir, stage="distill", arch=TINY_ARCH, teacher_uri=str(padded), train=train))
    assert manifest["history"][-1]["kd"] > 0


def test_layer_wise_hidden_state_distillation_through_the_config(tmp_path, task_data, tiny_model_dir):
    """distill.loss.hidden: per-layer states of both models, a learned projection (16 → 32 wide)."""
    narrow = {**TINY_ARCH, "hidden_size": 16, "intermediate_size": 32}
    train = DistillConfig(
        steps=12, batch_size=8, warmup_steps=1, log_every=4,
        loss={"hidden": {"weight": 1.0, "layer_map": "uniform", "loss": "mse"}},
    ).model_dump()
    manifest = run_training(job(tmp_path, task_data, tiny_model_dir, stage="distill", arch=narrow, teacher_uri=tiny_model_dir, train=train))
    hidden = [h["hidden"] for h in manifest["history"]]
    assert all(v > 0 for v in hidden) and hidden[-1] < hidden[0]


def test_a_cut_student_aligns_each_kept_block_with_the_teacher_block_it_came_from(tmp_path, task_data, demo_tokenizer):
    """layer_map: kept reads the cut's blocks from its student-init manifest; a student not cut is refused."""
    from mydistill.models import ensure_cut_student
    from tests.conftest import save_tiny_model

    teacher = save_tiny_model(tmp_path / "teacher", demo_tokenizer, seed=1, arch={**TINY_ARCH, "num_hidden_layers": 3})
    cut = str(tmp_path / "cut")
    ensure_cut_student(teacher, [0, 2], None, cut)
    train = DistillConfig(
        steps=6, batch_size=8, warmup_steps=1, log_every=2, loss={"hidden": {"layer_map": "kept", "loss": "cosine"}},
    ).model_dump()
    manifest = run_training(job(tmp_path, task_data, cut, stage="distill", init_uri=cut, teacher_uri=teacher, train=train))
    hidden = [h["hidden"] for h in manifest["history"]]
    assert all(0 < v <= 2 for v in hidden)  # 1 - cos, over the pairs (1, 1) and (2, 3)
    assert manifest["inputs"]["train"]["loss"]["hidden"]["layer_map"] == "kept"
    with pytest.raises(ValueError, match="was not cut from the teacher"):
        run_training(job(tmp_path / "arch", task_data, teacher, stage="distill", arch={**TINY_ARCH, "num_hidden_layers": 2},
                         teacher_uri=teacher, train=train))


def test_teacher_loaded_in_bf16_distills_an_fp32_student(tmp_path, task_data, tiny_model_dir):
    # teacher.dtype reaches the frozen teacher; the student keeps fp32 master weights
    train = DistillConfig(steps=6, batch_size=16, warmup_steps=1, log_every=3, eval_every=3)
    the_job = job(tmp_path, task_data, tiny_model_dir, stage="distill", arch=TINY_ARCH, teacher_uri=tiny_model_dir,
                  teacher_dtype="bfloat16", train=train.model_dump())
    manifest = run_training(the_job)
    assert manifest["teacher_dtype"] == "bfloat16"
    assert manifest["inputs"]["teacher_dtype"] == "bfloat16"
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in manifest["history"])
    assert next(load_model(str(tmp_path / "out")).parameters()).dtype == torch.float32
    fp32 = run_training(job(tmp_path / "fp32", task_data, tiny_model_dir, stage="distill", arch=TINY_ARCH,
                            teacher_uri=tiny_model_dir, train=train.model_dump()))
    assert fp32["teacher_dtype"] == "float32"
    # the same run in bf16 and fp32 teachers: close, not identical
    assert abs(fp32["history"][0]["kd"] - manifest["history"][0]["kd"]) < 0.05 * fp32["history"][0]["kd"] + 1e-3


def test_a_second_writer_on_one_checkpoint_folder_is_refused(tmp_path, task_data, tiny_model_dir):
    from mydistill.training.checkpoints import lock_checkpoints, unlock_checkpoints

    the_job = job(tmp_path, task_data, tiny_model_dir, arch=TINY_ARCH, steps=4)
    held = lock_checkpoints(the_job.checkpoints())  # as a run still training would
    with pytest.raises(TrainingError, match=rf"out.checkpoints: another training run \(pid {os.getpid()}\) is writing"):
        run_training(the_job)
    assert not (tmp_path / "out").exists()
    unlock_checkpoints(the_job.checkpoints(), held)
    run_training(the_job)
    assert not (tmp_path / "out.checkpoints.lock").exists() and not (tmp_path / "out.checkpoints").exists()


def test_frozen_parameters_stay_as_they_started_and_the_rest_is_trained(tmp_path, task_data, tiny_model_dir):
    start = load_model(tiny_model_dir)
    train = TrainConfig(steps=6, batch_size=16, lr=3e-3, warmup_steps=1, log_every=3, eval_every=3,
                        freeze=["lm_head.weight", "*.mlp.*"])
    manifest = run_training(job(tmp_path, task_data, tiny_model_dir, init_uri=tiny_model_dir, train=train.model_dump()))
    trained = load_model(str(tmp_path / "out"))
    before, after = start.state_dict(), trained.state_dict()
    # the head is tied to the input embedding: frozen by its other name too
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])
    frozen = before["model.embed_tokens.weight"].numel() + sum(
        v.numel() for k, v in before.items() if ".mlp." in k)
    assert manifest["frozen_parameters"] == frozen
    # what is frozen is part of what the output was made from
    unfrozen = TrainConfig(**{**train.model_dump(), "freeze": []})
    other = run_training(job(tmp_path / "b", task_data, tiny_model_dir, init_uri=tiny_model_dir, train=unfrozen.model_dump()))
    assert other["inputs_sha256"] != manifest["inputs_sha256"] and "frozen_parameters" not in other


def test_a_freeze_pattern_that_names_no_parameter_is_refused_before_training(tmp_path, task_data, tiny_model_dir):
    train = TrainConfig(steps=2, batch_size=16, warmup_steps=1, freeze=["model.embed.*"])
    with pytest.raises(TrainingError, match=r"finetune.freeze: 'model.embed.\*' names no parameter of the student .*model.embed_tokens.weight"):
        run_training(job(tmp_path, task_data, tiny_model_dir, init_uri=tiny_model_dir, train=train.model_dump()))
    everything = TrainConfig(steps=2, batch_size=16, warmup_steps=1, freeze=["*"])
    with pytest.raises(TrainingError, match="freezes every parameter"):
        run_training(job(tmp_path, task_data, tiny_model_dir, init_uri=tiny_model_dir, train=everything.model_dump()))
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")
