"""On-policy distillation (GKD): student-sampled batches, the λ mixture, and learning from them."""

import pytest
import torch

from mydistill.losses import DistillObjective, LossConfig
from mydistill.models import build_model
from mydistill.on_policy import (
    OnPolicyConfig,
    OnPolicyMixer,
    eos_ids_of,
    prompt_ids_of,
    sample_from_student,
    student_batch,
)
from mydistill.tokenization import IGNORE_INDEX, collate, shift_labels, tokenize_example

from tests.conftest import TINY_ARCH


@pytest.fixture(scope="module")
def records():
    from mydistill.demo.task import make_examples

    return [{"prompt": e["prompt"], "response": e["answer"]} for e in make_examples(64, seed=21)]


@pytest.fixture(scope="module")
def pair(demo_tokenizer):
    """A confident random teacher and a student that disagrees with it."""
    teacher = build_model({**TINY_ARCH, "tie_word_embeddings": False}, demo_tokenizer, seed=1).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)
    return teacher


def offline_batch(tokenizer, records):
    return collate([tokenize_example(tokenizer, r["prompt"], r["response"], 48) for r in records], tokenizer.pad_token_id)


def test_prompts_come_back_from_a_collated_batch(demo_tokenizer, records):
    batch = offline_batch(demo_tokenizer, records[:3])
    for prompt_ids, record in zip(prompt_ids_of(batch), records[:3], strict=True):
        example = tokenize_example(demo_tokenizer, record["prompt"], record["response"], 48)
        assert prompt_ids == example.input_ids[: example.labels.count(IGNORE_INDEX)]


def test_student_samples_become_a_batch_labelled_on_the_response(demo_tokenizer, records):
    student = build_model(TINY_ARCH, demo_tokenizer, seed=2)
    student.train()
    prompts = prompt_ids_of(offline_batch(demo_tokenizer, records[:5]))
    eos = eos_ids_of(student, demo_tokenizer)
    responses = sample_from_student(
        student, prompts, max_new_tokens=6, eos_token_ids=eos, pad_token_id=demo_tokenizer.pad_token_id, seed=3
    )
    assert student.training  # mode restored
    assert all(1 <= len(r) <= 6 for r in responses)
    assert all(r[-1] in eos or len(r) == 6 for r in responses) and all(t not in eos for r in responses for t in r[:-1])
    again = sample_from_student(
        student, prompts, max_new_tokens=6, eos_token_ids=eos, pad_token_id=demo_tokenizer.pad_token_id, seed=3
    )
    assert again == responses  # seeded
    batch = student_batch(prompts, responses, demo_tokenizer.pad_token_id)
    for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        assert batch["input_ids"][row, : len(p) + len(r)].tolist() == p + r
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert labelled == r


def test_lambda_decides_the_share_of_on_policy_batches(demo_tokenizer):
    def share(fraction):
        mixer = OnPolicyMixer(OnPolicyConfig(fraction=fraction, seed=5), tokenizer=demo_tokenizer, eos_token_ids=[2])
        return sum(mixer.draw() for _ in range(2000)) / 2000

    assert share(0.0) == 0.0 and share(1.0) == 1.0
    assert share(0.3) == pytest.approx(0.3, abs=0.04)


def test_on_policy_objective_is_pure_divergence_and_shares_modules(demo_tokenizer):
    from mydistill.losses.config import HiddenStateLossConfig

    objective = DistillObjective(
        LossConfig(alpha=0.5, divergence="forward_kl", hidden=HiddenStateLossConfig(projection="linear")),
        student_hidden_size=32, student_num_layers=1, teacher_hidden_size=32, teacher_num_layers=1,
    )
    mixer = OnPolicyMixer(
        OnPolicyConfig(fraction=1.0, divergence="generalized_jsd"), tokenizer=demo_tokenizer, eos_token_ids=[2]
    )
    on_policy = mixer.objective(objective)
    assert on_policy.cfg.alpha == 1.0 and on_policy.cfg.divergence == "generalized_jsd"
    assert objective.cfg.alpha == 0.5 and objective.cfg.divergence == "forward_kl"
    assert on_policy.hidden is objective.hidden  # the learned projections are the same parameters
    assert mixer.objective(objective) is on_policy


def kd_loss(student, teacher, objective, batch):
    labels = shift_labels(batch["labels"])
    hidden = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    with torch.no_grad():
        t_hidden = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return objective(
        student_hidden=hidden, student_head_weight=student.lm_head.weight, labels=labels,
        teacher_hidden=t_hidden, teacher_head_weight=teacher.lm_head.weight,
    )


@torch.no_grad()
def agreement_on_own_samples(student, teacher, tokenizer, prompts, seed=99):
    """(top-1 agreement, forward KL) with the teacher on sequences the student itself generates."""
    responses = sample_from_student(
        student, prompts, max_new_tokens=6, eos_token_ids=eos_ids_of(student, tokenizer),
        pad_token_id=tokenizer.pad_token_id, seed=seed,
    )
    batch = student_batch(prompts, responses, tokenizer.pad_token_id)
    objective = DistillObjective(LossConfig(alpha=1.0), student_hidden_size=32, student_num_layers=1)
    metrics = kd_loss(student, teacher, objective, batch).metrics
    return metrics["teacher_agreement"], metrics["kd"]


def test_on_policy_training_raises_agreement_with_the_teacher(demo_tokenizer, records, pair):
    teacher = pair
    student = build_model(TINY_ARCH, demo_tokenizer, seed=7)
    objective = DistillObjective(LossConfig(alpha=0.5, temperature=1.0), student_hidden_size=32, student_num_layers=1)
    mixer = OnPolicyMixer(
        OnPolicyConfig(fraction=1.0, max_new_tokens=6, divergence="forward_kl"),
        tokenizer=demo_tokenizer, eos_token_ids=eos_ids_of(student, demo_tokenizer),
    )
    eval_prompts = prompt_ids_of(offline_batch(demo_tokenizer, records[48:]))
    before = agreement_on_own_samples(student, teacher, demo_tokenizer, eval_prompts)
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-2)
    for step in range(20):
        batch = offline_batch(demo_tokenizer, records[(step * 12) % 48 :][:12])
        assert mixer.draw()
        batch = mixer.replace(batch, student, step)
        out = kd_loss(student, teacher, mixer.objective(objective), batch)
        # alpha = 1 on student samples: the loss is the divergence alone, no CE on the student's own tokens
        assert out.loss.item() == pytest.approx(out.metrics["kd"], rel=1e-5)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = agreement_on_own_samples(student, teacher, demo_tokenizer, eval_prompts)
    assert mixer.sampled_batches == 20
    assert after[0] > before[0] + 0.1, (before, after)  # measured: 0.0 -> 0.18
    assert after[1] < 0.8 * before[1], (before, after)
