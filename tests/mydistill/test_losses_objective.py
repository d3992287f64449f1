"""DistillObjective, hidden-state distillation and distilling step-by-step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import TINY_ARCH

from mydistill.losses import (
    BatchSignal,
    DistillObjective,
    HiddenHead,
    HiddenStateDistiller,
    LossConfig,
    LossOutput,
    TeacherEnsemble,
    TopKTeacher,
    hidden_cosine,
    hidden_mse,
    kept_layer_map,
    resolve_layer_map,
    step_by_step_loss,
    uniform_layer_map,
)

B, T, H_S, H_T, V, L_S, L_T = 2, 5, 6, 10, 17, 2, 4


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :2] = -100
    attention = torch.ones(B, T, dtype=torch.long)
    attention[1, -1] = 0
    labels[1, -1] = -100
    return {
        "student_hidden": torch.randn(B, T, H_S, generator=gen),
        "student_head_weight": torch.randn(V, H_S, generator=gen) * 0.4,
        "labels": labels,
        "signal": BatchSignal(
            teacher=HiddenHead(torch.randn(B, T, H_T, generator=gen), torch.randn(V, H_T, generator=gen) * 0.4),
            hidden_states=[torch.randn(B, T, H_T, generator=gen) for _ in range(L_T + 1)],
            origin="online",
        ),
        "student_hidden_states": [torch.randn(B, T, H_S, generator=gen) for _ in range(L_S + 1)],
        "attention_mask": attention,
    }


def objective_pair(**cfg):
    """Same config, chunked and plain, sharing the projection weights."""
    chunked = DistillObjective(
        LossConfig(chunked=True, chunk_size=3, **cfg),
        student_hidden_size=H_S,
        student_num_layers=L_S,
        teacher_hidden_size=H_T,
        teacher_num_layers=L_T,
    )
    plain = DistillObjective(
        LossConfig(chunked=False, **cfg),
        student_hidden_size=H_S,
        student_num_layers=L_S,
        teacher_hidden_size=H_T,
        teacher_num_layers=L_T,
    )
    plain.load_state_dict(chunked.state_dict())
    return chunked, plain


def run(objective, inputs, **overrides):
    leaves = {
        "student_hidden": inputs["student_hidden"].clone().requires_grad_(),
        "student_head_weight": inputs["student_head_weight"].clone().requires_grad_(),
    }
    kwargs = {**inputs, **leaves, **overrides}
    out = objective(**kwargs)
    objective.zero_grad()
    out.loss.backward()
    grads = [leaves["student_hidden"].grad, leaves["student_head_weight"].grad]
    grads += [p.grad for p in objective.parameters() if p.requires_grad]
    return out, grads


def assert_outputs_close(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a.loss, out_b.loss, atol=1e-5, rtol=1e-5)
    assert out_a.metrics.keys() == out_b.metrics.keys()
    for key in out_a.metrics:
        assert out_a.metrics[key] == pytest.approx(out_b.metrics[key], abs=1e-5), key
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "generalized_jsd", "skew_reverse_kl", "logit_mse"])
def test_chunked_objective_equals_plain_with_hidden_states(divergence):
    chunked, plain = objective_pair(
        divergence=divergence,
        temperature=2.0,
        alpha=0.6,
        hidden={"weight": 0.5, "loss": "mse"},
    )
    inputs = batch()
    a, b = run(chunked, inputs), run(plain, inputs)
    assert_outputs_close(a, b)
    assert set(a[0].metrics) == {"kd", "ce", "tokens", "teacher_agreement", "hidden", "loss"}
    assert a[0].metrics["tokens"] == 7
    assert a[0].metrics["loss"] == pytest.approx(a[0].loss.item())


def test_objective_with_teacher_logits_topk_and_ensemble():
    chunked, plain = objective_pair(divergence="reverse_kl", alpha=1.0)
    inputs = batch(1)
    head = inputs.pop("signal").teacher
    t1 = head.hidden @ head.weight.T
    t2 = torch.randn_like(t1)
    for teacher in (TeacherEnsemble([t1, t2], [1.0, 2.0]), TopKTeacher.from_logits(t1, k=5), t1):
        assert_outputs_close(run(chunked, inputs, teacher=teacher), run(plain, inputs, teacher=teacher))
    with pytest.raises(ValueError, match="either as signal= or as teacher="):
        chunked(**inputs, teacher=t1, signal=BatchSignal(teacher=head))


def test_no_teacher_is_cross_entropy_only():
    objective = DistillObjective(
        LossConfig(alpha=0.9, temperature=3.0), student_hidden_size=H_S, student_num_layers=L_S
    )
    inputs = batch(2)
    out = objective(
        student_hidden=inputs["student_hidden"],
        student_head_weight=inputs["student_head_weight"],
        labels=inputs["labels"],
    )
    logits = inputs["student_hidden"] @ inputs["student_head_weight"].T
    expected = F.cross_entropy(logits.reshape(-1, V), inputs["labels"].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)
    assert isinstance(out, LossOutput)
    assert out.metrics["kd"] == 0.0 and "teacher_agreement" not in out.metrics and "hidden" not in out.metrics
    assert out.metrics["ce"] == pytest.approx(expected.item(), rel=1e-5)


def layer_wise(cfg: LossConfig, teacher_hidden_size: int = H_T) -> DistillObjective:
    """An objective for L_S student and L_T teacher layers (hidden-state distillation needs the shapes)."""
    return DistillObjective(
        cfg, student_hidden_size=H_S, student_num_layers=L_S, teacher_hidden_size=teacher_hidden_size,
        teacher_num_layers=L_T,
    )


def test_objective_owns_projections_and_ted_filters():
    auto = layer_wise(LossConfig(hidden={}))
    assert sum(p.numel() for p in auto.parameters()) == L_S * H_S * H_T  # one W_h per uniform pair
    same_width = layer_wise(LossConfig(hidden={}), teacher_hidden_size=H_S)
    assert list(same_width.parameters()) == []
    ted = layer_wise(LossConfig(hidden={"projection": "ted", "filter_size": 4}))
    trainable = [p for p in ted.parameters() if p.requires_grad]
    frozen = [p for p in ted.parameters() if not p.requires_grad]
    assert sum(p.numel() for p in trainable) == L_S * (H_S * 4 + 4)
    assert sum(p.numel() for p in frozen) == L_S * (H_T * 4 + 4)
    out, _ = run(ted, batch(3))
    assert out.metrics["hidden"] > 0
    with pytest.raises(ValueError, match="teacher_hidden_size"):
        DistillObjective(LossConfig(hidden={}), student_hidden_size=H_S, student_num_layers=L_S)


def test_hidden_section_without_hidden_states_is_a_clear_error():
    objective = layer_wise(LossConfig(hidden={}))
    inputs = batch(4)
    inputs["signal"] = BatchSignal(teacher=inputs["signal"].teacher, origin="online")
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        objective(**inputs)


def test_step_by_step_combines_the_two_passes():
    cfg = LossConfig(step_by_step={"label_weight": 1.0, "rationale_weight": 0.5})
    objective = DistillObjective(cfg, student_hidden_size=H_S, student_num_layers=L_S)
    label_batch, rationale_batch = batch(5), batch(6)
    keys = ("student_hidden", "student_head_weight", "labels")
    label = objective(**{k: label_batch[k] for k in keys})
    rationale = objective(**{k: rationale_batch[k] for k in keys})
    combined = objective.combine_step_by_step(label, rationale)
    torch.testing.assert_close(combined.loss, label.loss + 0.5 * rationale.loss)
    assert combined.metrics["label/ce"] == label.metrics["ce"]
    assert combined.metrics["rationale/ce"] == rationale.metrics["ce"]
    # the pure function: L = label_weight * CE(label) + rationale_weight * CE(rationale)
    logits = [b["student_hidden"] @ b["student_head_weight"].T for b in (label_batch, rationale_batch)]
    pure = step_by_step_loss(
        logits[0], label_batch["labels"], logits[1], rationale_batch["labels"], rationale_weight=0.5
    )
    torch.testing.assert_close(pure, combined.loss, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="step_by_step"):
        DistillObjective(LossConfig(), student_hidden_size=H_S, student_num_layers=L_S).combine_step_by_step(
            label, rationale
        )


# ------------------------------------------------------------------------ hidden-state losses


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 8), width=st.integers(1, 6), scale=st.floats(0.1, 10.0))
def test_hidden_losses_properties(seed, n, width, scale):
    gen = torch.Generator().manual_seed(seed)
    s, t = torch.randn(n, width, generator=gen), torch.randn(n, width, generator=gen)
    assert hidden_mse(s, s).item() == 0.0
    assert hidden_cosine(s, s).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_mse(s, t).item() >= 0.0
    assert 0.0 <= hidden_cosine(s, t).item() <= 2.0 + 1e-6
    # cosine ignores scale, MSE does not
    assert hidden_cosine(scale * s, t).item() == pytest.approx(hidden_cosine(s, t).item(), abs=1e-5)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[0] = True
    torch.testing.assert_close(hidden_mse(s, t, mask), hidden_mse(s[:1], t[:1]))


def test_kept_layer_map_pairs_each_block_of_a_cut_student_with_the_block_it_was_copied_from(demo_tokenizer):
    from mydistill.models import build_model, cut_student

    assert kept_layer_map([0, 1, 5], 6) == [(1, 1), (2, 2), (3, 6)]
    assert resolve_layer_map("kept", 3, 6, teacher_layers=[0, 1, 5]) == [(1, 1), (2, 2), (3, 6)]
    with pytest.raises(ValueError, match="was not cut from the teacher"):
        resolve_layer_map("kept", 3, 6)
    with pytest.raises(ValueError, match="has 2 blocks but was cut from 3 teacher blocks"):
        resolve_layer_map("kept", 2, 6, teacher_layers=[0, 1, 5])
    with pytest.raises(ValueError, match=r"teacher blocks \[6\] are not in 0..5"):
        kept_layer_map([0, 6], 6)
    # a real cut: blocks 0, 1 and 2 of a 6-block teacher come first, unchanged, so before any
    # training the kept pairs of those blocks match exactly where the uniform map compares others
    teacher = build_model({**TINY_ARCH, "num_hidden_layers": 6}, demo_tokenizer, seed=0).eval()
    student = cut_student(teacher, [0, 1, 2, 5]).eval()
    ids = torch.tensor([[1, 5, 9, 4, 2]])
    with torch.no_grad():
        s_states = student(input_ids=ids, output_hidden_states=True).hidden_states
        t_states = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    kept = resolve_layer_map("kept", 4, 6, teacher_layers=[0, 1, 2, 5])
    assert kept == [(1, 1), (2, 2), (3, 3), (4, 6)]
    assert [hidden_mse(s_states[s], t_states[t]).item() for s, t in kept[:3]] == [0.0, 0.0, 0.0]
    uniform = uniform_layer_map(4, 6)
    assert uniform[1:3] == [(2, 3), (3, 4)]
    assert all(hidden_mse(s_states[s], t_states[t]).item() > 1e-6 for s, t in uniform[1:3])
    distiller = HiddenStateDistiller(
        student_hidden_size=TINY_ARCH["hidden_size"], teacher_hidden_size=TINY_ARCH["hidden_size"],
        student_num_layers=4, teacher_num_layers=6, layer_map="kept", teacher_layers=[0, 1, 2, 5],
    )
    assert distiller.pairs == kept


def test_layer_maps():
    assert uniform_layer_map(2, 4) == [(1, 2), (2, 4)]
    assert uniform_layer_map(3, 12) == [(1, 4), (2, 8), (3, 12)]
    assert uniform_layer_map(4, 6) == [(1, 1), (2, 3), (3, 4), (4, 6)]
    assert resolve_layer_map([[0, 0], [2, 4]], 2, 4) == [(0, 0), (2, 4)]
    with pytest.raises(ValueError, match="teacher layer must be in 0..4"):
        resolve_layer_map([[1, 5]], 2, 4)
    with pytest.raises(ValueError, match="'uniform', 'kept' or a list"):
        resolve_layer_map("spread", 2, 4)
    with pytest.raises(ValueError, match="needs equal widths"):
        HiddenStateDistiller(
            student_hidden_size=4, teacher_hidden_size=8, student_num_layers=2, teacher_num_layers=4, projection="none"
        )
    distiller = HiddenStateDistiller(
        student_hidden_size=4, teacher_hidden_size=4, student_num_layers=2, teacher_num_layers=4
    )
    states = [torch.randn(3, 4) for _ in range(3)]
    with pytest.raises(ValueError, match="teacher layer 4 but got 3"):
        distiller(states, states)


def test_a_batch_signal_splits_by_example_rows_and_the_step_by_step_wrapper_uses_it():
    from mydistill.losses import ULDSignal
    from mydistill.training.step_by_step import StepByStepObjective

    cfg = LossConfig(alpha=0.5, step_by_step={"label_weight": 1.0, "rationale_weight": 0.5}, hidden={"weight": 0.3})
    objective = layer_wise(cfg)
    inputs = batch(7)
    signal = inputs["signal"]
    first = signal.rows(slice(0, 1))
    assert torch.equal(first.teacher.hidden, signal.teacher.hidden[:1]) and first.teacher.weight is signal.teacher.weight
    assert [h.shape[0] for h in first.hidden_states] == [1] * (L_T + 1)
    # the wrapper's two passes are the objective on each half of the rows, with each half's signal
    wrapped = StepByStepObjective(objective)(label_rows=torch.tensor(1), **inputs)
    halves = []
    for rows in (slice(0, 1), slice(1, None)):
        part = {k: (v[rows] if isinstance(v, torch.Tensor) else [h[rows] for h in v]) for k, v in inputs.items() if k != "signal"}
        halves.append(objective(**{**part, "student_head_weight": inputs["student_head_weight"]}, signal=signal.rows(rows)))
    torch.testing.assert_close(wrapped.loss, objective.combine_step_by_step(*halves).loss)
    # a signal looked up by example index cannot be split, and says so
    looked_up = BatchSignal(uld=ULDSignal(torch.randn(3, 7), torch.arange(3)), origin="uld")
    with pytest.raises(ValueError, match="needs the online teacher .* not a uld teacher signal"):
        StepByStepObjective(objective)(label_rows=1, **{**inputs, "signal": looked_up})
    with pytest.raises(ValueError, match="cannot be split by rows"):
        looked_up.rows(slice(0, 1))
