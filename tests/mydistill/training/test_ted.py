"""TED stage 1: the teacher filters trained on the task, the teacher frozen (mydistill.losses.ted)."""

import math
import os

import pytest
import torch
from pydantic import ValidationError

from mydistill import io
from mydistill.config import DistillConfig
from mydistill.losses import HiddenStateDistiller, LossConfig
from mydistill.losses.ted import filter_task_loss, final_norm_of, fit_teacher_filters
from mydistill.models import build_model
from mydistill.tokenization import collate, tokenize_example
from mydistill.train import TrainingError, TrainJob, run_training
from mydistill.training.ted import TED_FILTERS_FILE

from tests.conftest import TINY_ARCH

TEACHER_ARCH = {**TINY_ARCH, "num_hidden_layers": 2}
NARROW_ARCH = {**TINY_ARCH, "hidden_size": 16, "intermediate_size": 32}


@pytest.fixture(scope="module")
def demo_rows():
    from mydistill.demo.task import make_examples

    return [{"prompt": e["prompt"], "response": e["answer"]} for e in make_examples(64, seed=5)]


@pytest.fixture
def task_data(tmp_path, demo_rows):
    uri = str(tmp_path / "train.jsonl")
    io.write_records(uri, demo_rows)
    return uri


def _batches(rows, tokenizer, batch_size=16):
    examples = [tokenize_example(tokenizer, r["prompt"], r["response"], 64) for r in rows]
    while True:
        for start in range(0, len(examples) - batch_size + 1, batch_size):
            yield collate(examples[start : start + batch_size], tokenizer.pad_token_id)


def _distiller(**kw):
    return HiddenStateDistiller(
        student_hidden_size=16, teacher_hidden_size=32, student_num_layers=1, teacher_num_layers=2,
        projection="ted", **kw,
    )


def test_stage_one_lowers_the_filter_ce_and_leaves_the_teacher_alone(demo_tokenizer, demo_rows):
    teacher = build_model(TEACHER_ARCH, demo_tokenizer, seed=1).eval().requires_grad_(False)
    # behind the norm, a freshly initialised head (std 0.02) spans logits of well under 1, so no filter
    # could move the CE far from uniform; a trained teacher's head is larger, as here
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(0)
    distiller = _distiller(layer_map=[[1, 1], [1, 2]], filter_size=24)  # an inner layer and the last
    initial = [f.weight.clone() for f in distiller.teacher_filters]

    fit = fit_teacher_filters(distiller, teacher, _batches(demo_rows, demo_tokenizer), steps=30, lr=1e-2)

    assert len(fit.history) == 30 and all(math.isfinite(v) for v in fit.history)
    assert fit.ce_end < fit.ce_start - 1.0, fit.history
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p.requires_grad for p in distiller.teacher_filters.parameters())
    assert all(not torch.equal(w, f.weight) for w, f in zip(initial, distiller.teacher_filters, strict=True))
    assert all(p.requires_grad for p in distiller.student_filters.parameters())  # stage 2 still learns these


def test_chunked_filter_loss_matches_one_chunk(demo_tokenizer, demo_rows):
    """Chunked (recomputed in backward) == one chunk: value and gradients of filter and back map."""
    teacher = build_model(TEACHER_ARCH, demo_tokenizer, seed=1).eval().requires_grad_(False)
    batch = next(_batches(demo_rows, demo_tokenizer, batch_size=4))
    with torch.no_grad():
        hidden = teacher.model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[1][:, :-1]
    labels = batch["labels"][:, 1:]
    results = []
    for chunk_size in (5, 10_000):
        torch.manual_seed(0)
        filt, back = torch.nn.Linear(32, 24), torch.nn.Linear(24, 32)
        ce, n = filter_task_loss(hidden, labels, filt, back, final_norm_of(teacher), teacher.lm_head.weight,
                                 chunk_size=chunk_size)
        (ce / n).backward()
        results.append((ce.detach(), n, [p.grad.clone() for p in (*filt.parameters(), *back.parameters())]))
    (ce_a, n_a, grads_a), (ce_b, n_b, grads_b) = results
    assert n_a == n_b == (labels != -100).sum() and n_a > 5
    torch.testing.assert_close(ce_a, ce_b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_round_trip_starts_as_the_teachers_own_head(demo_tokenizer, demo_rows):
    """Orthogonal filters as wide as the teacher, g = f^T: stage 1 starts from the teacher's own CE."""
    teacher = build_model(TEACHER_ARCH, demo_tokenizer, seed=1).eval().requires_grad_(False)
    batch = next(_batches(demo_rows, demo_tokenizer))
    distiller = _distiller(layer_map=[[1, 2]])
    fit = fit_teacher_filters(distiller, teacher, iter([batch]), steps=1)
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    own = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    # the last hidden state is already normed; norming it again changes little at RMS ~1
    assert fit.ce_start == pytest.approx(own.item(), rel=0.05)


def test_fit_needs_ted_filters_and_enough_batches(demo_tokenizer, demo_rows):
    teacher = build_model(TEACHER_ARCH, demo_tokenizer, seed=1).eval().requires_grad_(False)
    linear = HiddenStateDistiller(student_hidden_size=16, teacher_hidden_size=32, student_num_layers=1,
                                  teacher_num_layers=2, projection="linear")
    with pytest.raises(ValueError, match="projection='ted'"):
        fit_teacher_filters(linear, teacher, _batches(demo_rows, demo_tokenizer), steps=1)
    distiller = _distiller()
    with pytest.raises(ValueError, match="got 1 batches for 3 steps"):
        fit_teacher_filters(distiller, teacher, iter([next(_batches(demo_rows, demo_tokenizer))]), steps=3)
    assert not any(p.requires_grad for p in distiller.teacher_filters.parameters())  # frozen even on failure


def test_teacher_filter_steps_need_projection_ted():
    with pytest.raises(ValidationError, match="teacher_filter_steps trains TED teacher filters.*projection is 'auto'"):
        LossConfig(hidden={"teacher_filter_steps": 10})
    with pytest.raises(ValidationError, match="teacher_filter_steps"):
        LossConfig(hidden={"projection": "ted", "teacher_filter_steps": -1})
    assert LossConfig(hidden={"projection": "ted", "teacher_filter_steps": 10}).hidden.teacher_filter_steps == 10


def _ted_job(tmp_path, data, model_dir, steps=8, **train_kw):
    train = DistillConfig(
        steps=steps, batch_size=8, warmup_steps=1, log_every=2,
        loss={"hidden": {"projection": "ted", "filter_size": 16, "teacher_filter_steps": 10,
                         "teacher_filter_lr": 1e-2}},
        **train_kw,
    ).model_dump()
    return TrainJob(stage="distill", data_uri=data, output_uri=str(tmp_path / "out"), tokenizer_uri=model_dir,
                    arch=NARROW_ARCH, teacher_uri=model_dir, train=train)


def test_distill_run_trains_the_teacher_filters_first(tmp_path, task_data, tiny_model_dir, capsys):
    seen = []
    manifest = run_training(_ted_job(tmp_path, task_data, tiny_model_dir), on_metrics=lambda m, s: seen.append((s, m)))
    assert manifest["ted_filter_ce_end"] < manifest["ted_filter_ce_start"]
    assert manifest["ted_filter_steps"] == 10
    assert seen[0] == (0, {k: manifest[k] for k in ("ted_filter_ce_start", "ted_filter_ce_end", "ted_filter_steps")})
    hidden = [h["hidden"] for h in manifest["history"]]
    assert all(math.isfinite(v) and v > 0 for v in hidden)
    assert "TED teacher filters trained for 10 steps, CE" in capsys.readouterr().out


def test_resumed_run_reloads_the_filters_instead_of_training_them_again(tmp_path, task_data, tiny_model_dir, monkeypatch):
    import mydistill.losses.ted as ted_module
    import mydistill.train as train_module

    from tests.mydistill.training.test_train import poison_loss_at

    real = poison_loss_at(monkeypatch, 5)
    the_job = _ted_job(tmp_path, task_data, tiny_model_dir, save_every=2)
    first = []
    with pytest.raises(TrainingError, match="step 5"):
        run_training(the_job, on_metrics=lambda m, s: first.append(m) if s == 0 else None)
    assert os.path.exists(tmp_path / "out.checkpoints" / TED_FILTERS_FILE)

    monkeypatch.setattr(train_module, "forward_loss", real)

    def must_not_run(*args, **kwargs):
        raise AssertionError("stage 1 ran again on resume")

    monkeypatch.setattr(ted_module, "fit_teacher_filters", must_not_run)
    manifest = run_training(the_job)
    assert manifest["history"][-1]["step"] == 8
    assert {k: manifest[k] for k in first[0]} == first[0]


@pytest.mark.slow
def test_stage_one_before_zero3_on_two_processes(tmp_path, task_data, tiny_model_dir):
    """Every rank trains the filters on the same batches (then takes rank 0's) before ZeRO-3 partitions them."""
    from mydistill.training.launch import launch_training
    from tests.mydistill.training.test_train_distributed import ZERO3, make_job

    loss = {"hidden": {"projection": "ted", "filter_size": 16, "teacher_filter_steps": 10, "teacher_filter_lr": 1e-2}}
    job = make_job(tmp_path / "out", task_data, tiny_model_dir, teacher=tiny_model_dir, steps=6, deepspeed=ZERO3,
                   arch=NARROW_ARCH, loss=loss)
    lines: list[str] = []
    manifest = launch_training(job, on_line=lines.append)
    assert manifest["world_size"] == 2
    assert manifest["ted_filter_ce_end"] < manifest["ted_filter_ce_start"]
    assert sum("TED teacher filters trained for 10 steps" in line for line in lines) == 1  # rank 0 alone
    assert math.isfinite(manifest["history"][-1]["hidden"])
