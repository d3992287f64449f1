"""Properties of the plain distillation losses (mydistill.losses.divergences) and LossConfig."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mydistill.losses import (
    DIVERGENCES,
    DistillMix,
    LossConfig,
    TeacherEnsemble,
    TopKTeacher,
    VocabSizeMismatch,
    distill_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    symmetric_kl,
    tvd,
)
from mydistill.losses.divergences import DIVERGENCE_NAMES, divergence_kwargs
from mydistill.losses.teacher_signal import MIN_RESIDUAL

FAST = settings(max_examples=12, deadline=None)
DISTRIBUTION_DIVERGENCES = [n for n in DIVERGENCE_NAMES if n != "logit_mse"]


@st.composite
def logit_pairs(draw, dtype=torch.float32):
    """Random (N, V) student and teacher logits, from a drawn seed so examples stay cheap."""
    n = draw(st.integers(1, 6))
    v = draw(st.integers(2, 12))
    scale = draw(st.floats(0.1, 6.0))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    student = (torch.randn(n, v, generator=gen, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(n, v, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return student, teacher


def call(name: str, student, teacher, **kw):
    params = divergence_kwargs(name, beta=kw.pop("beta", 0.5), skew_alpha=kw.pop("skew_alpha", 0.1))
    return DIVERGENCES[name](student, teacher, **params, **kw)


# ---------------------------------------------------------------------------------- basics


def test_registry_lists_the_family():
    assert (
        set(DIVERGENCES)
        == set(DIVERGENCE_NAMES)
        == {
            "forward_kl",
            "reverse_kl",
            "symmetric_kl",
            "generalized_jsd",
            "skew_kl",
            "skew_reverse_kl",
            "tvd",
            "logit_mse",
        }
    )


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@FAST
@given(pair=logit_pairs(), temperature=st.floats(0.25, 4.0))
def test_nonnegative_and_zero_for_identical_inputs(name, pair, temperature):
    student, teacher = pair
    assert call(name, student, teacher, temperature=temperature).item() >= -1e-6
    assert call(name, student, student.clone(), temperature=temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_forward_kl_matches_the_textbook_formula():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    expected = torch.nn.functional.kl_div(torch.log_softmax(s / 2, -1), torch.softmax(t / 2, -1), reduction="batchmean")
    assert forward_kl(s, t, temperature=2.0).item() == pytest.approx(expected.item(), rel=1e-5)


@FAST
@given(pair=logit_pairs(torch.float64))
def test_jsd_beta_limits_are_the_named_kls(pair):
    s, t = pair
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.0), forward_kl(s, t))
    torch.testing.assert_close(generalized_jsd(s, t, beta=1.0), reverse_kl(s, t))
    # the formula itself: JSD(β) / β -> KL(p || q) as β -> 0 (GKD's interpolation claim); the
    # approximation needs β p << q everywhere, so bound the logits for this check
    s3, t3, small = 3 * torch.tanh(s / 3), 3 * torch.tanh(t / 3), 1e-8
    assert (generalized_jsd(s3, t3, beta=small) / small).item() == pytest.approx(
        forward_kl(s3, t3).item(), rel=1e-4, abs=1e-9
    )
    # β = 0.5 is the symmetric Jensen-Shannon divergence, bounded by log 2
    jsd = generalized_jsd(s, t, beta=0.5)
    torch.testing.assert_close(jsd, generalized_jsd(t, s, beta=0.5))
    assert jsd.item() <= math.log(2) + 1e-9


@FAST
@given(pair=logit_pairs(torch.float64), alpha=st.floats(0.0, 1.0))
def test_skew_limits_and_bounds(pair, alpha):
    s, t = pair
    torch.testing.assert_close(skew_kl(s, t, alpha=0.0), forward_kl(s, t))
    torch.testing.assert_close(skew_reverse_kl(s, t, alpha=0.0), reverse_kl(s, t))
    assert skew_kl(s, t, alpha=1.0).item() == pytest.approx(0.0, abs=1e-12)
    assert skew_reverse_kl(s, t, alpha=1.0).item() == pytest.approx(0.0, abs=1e-12)
    # convexity of KL in its second argument: skewing by α shrinks it by at least (1 - α)
    assert skew_kl(s, t, alpha=alpha).item() <= (1 - alpha) * forward_kl(s, t).item() + 1e-9
    assert skew_reverse_kl(s, t, alpha=alpha).item() <= (1 - alpha) * reverse_kl(s, t).item() + 1e-9


@FAST
@given(pair=logit_pairs(torch.float64))
def test_symmetric_kl_and_tvd_relations(pair):
    s, t = pair
    torch.testing.assert_close(symmetric_kl(s, t), forward_kl(s, t) + reverse_kl(s, t))
    torch.testing.assert_close(symmetric_kl(s, t), symmetric_kl(t, s))
    d = tvd(s, t).item()
    assert 0.0 <= d <= 1.0
    # Pinsker, per token, so also for the mean: TVD <= sqrt(KL / 2) (Jensen on the mean of sqrt)
    per_token_bound = torch.stack([forward_kl(s[i : i + 1], t[i : i + 1]) for i in range(s.shape[0])])
    assert d <= (per_token_bound / 2).sqrt().mean().item() + 1e-9


# ---------------------------------------------------------------------------- temperature


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@FAST
@given(pair=logit_pairs(torch.float64), temperature=st.floats(0.25, 8.0))
def test_temperature_divides_the_logits(name, pair, temperature):
    s, t = pair
    torch.testing.assert_close(
        call(name, s, t, temperature=temperature, beta=0.3, skew_alpha=0.2),
        call(name, s / temperature, t / temperature, temperature=1.0, beta=0.3, skew_alpha=0.2),
    )


@FAST
@given(pair=logit_pairs(torch.float64))
def test_hinton_high_temperature_limit_is_logit_matching(pair):
    # Hinton et al. 2015 §2.1: for large T, T² KL -> (1 / 2V) sum_v (d_v - mean d)² with d = s - t
    s, t = pair
    temperature = 1e4
    lhs = temperature**2 * forward_kl(s, t, temperature=temperature)
    d = s - t
    rhs = 0.5 * d.var(dim=-1, unbiased=False).mean()
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("name", DISTRIBUTION_DIVERGENCES)
def test_infinite_temperature_gives_zero(name):
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 9, generator=gen, dtype=torch.float64), torch.randn(4, 9, generator=gen, dtype=torch.float64)
    assert call(name, s, t, temperature=1e8).item() == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------------- masking and shapes


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@FAST
@given(pair=logit_pairs(), data=st.data())
def test_masked_tokens_contribute_nothing(name, pair, data):
    s, t = pair
    n = s.shape[0]
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    labels = torch.where(keep, torch.zeros(n, dtype=torch.long), torch.full((n,), -100))
    s1 = s.clone().requires_grad_()
    loss = call(name, s1, t, labels=labels, temperature=1.5)
    if keep.any():
        torch.testing.assert_close(loss, call(name, s[keep], t[keep], temperature=1.5))
    else:
        assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(s1.grad).all()
    assert (s1.grad[~keep] == 0).all()
    # garbage in the masked rows changes nothing
    s2, t2 = s.clone(), t.clone()
    s2[~keep] = 1e4
    t2[~keep] = -1e4
    torch.testing.assert_close(call(name, s2, t2, mask=keep, temperature=1.5), loss.detach())


def test_leading_dimensions_are_flattened_and_mean_is_per_valid_token():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 11, generator=gen), torch.randn(2, 3, 11, generator=gen)
    torch.testing.assert_close(forward_kl(s, t), forward_kl(s.reshape(6, 11), t.reshape(6, 11)))
    # the mean over tokens does not change when every token is repeated
    torch.testing.assert_close(forward_kl(s, t), forward_kl(torch.cat([s, s]), torch.cat([t, t])))


def test_zero_valid_tokens_is_zero_with_zero_gradient():
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5)
    labels = torch.full((3,), -100)
    parts = distill_loss(s, t, labels=labels, mix=DistillMix(alpha=0.5, temperature=2.0))
    assert parts.loss.item() == 0.0
    parts.loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_low_precision_inputs_are_upcast():
    gen = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 10, generator=gen), torch.randn(4, 10, generator=gen)
    out = forward_kl(s.bfloat16(), t.bfloat16(), temperature=2.0)
    assert out.dtype == torch.float32
    ref = forward_kl(s.bfloat16().float(), t.bfloat16().float(), temperature=2.0)
    torch.testing.assert_close(out, ref)


def test_teacher_with_excluded_tokens_is_finite():
    # a teacher that rules tokens out with -inf logits: 0 * log 0 = 0, not nan
    s = torch.randn(3, 6, requires_grad=True)
    t = torch.randn(3, 6)
    t[:, 0] = -math.inf
    for name in DISTRIBUTION_DIVERGENCES:
        if name in ("reverse_kl", "symmetric_kl"):
            continue  # the student puts mass where p = 0: reverse KL is +inf, correctly
        loss = call(name, s, t)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all(), name
        s.grad = None


def test_hinton_mix_weights_soft_and_hard_terms():
    gen = torch.Generator().manual_seed(4)
    s, t = torch.randn(6, 9, generator=gen), torch.randn(6, 9, generator=gen)
    labels = torch.randint(0, 9, (6,), generator=gen)
    labels[2] = -100
    parts = distill_loss(s, t, labels=labels, mix=DistillMix("reverse_kl", temperature=2.0, alpha=0.3))
    kd = reverse_kl(s, t, labels=labels, temperature=2.0)
    ce = torch.nn.functional.cross_entropy(s, labels, ignore_index=-100)
    torch.testing.assert_close(parts.loss, 0.3 * 4.0 * kd + 0.7 * ce)
    torch.testing.assert_close(parts.kd, kd)
    torch.testing.assert_close(parts.ce, ce)
    assert parts.num_tokens.item() == 5
    no_teacher = distill_loss(s, None, labels=labels)
    torch.testing.assert_close(no_teacher.loss, ce)
    with pytest.raises(ValueError, match="needs labels"):
        distill_loss(s, t, mix=DistillMix(alpha=0.5))


# ------------------------------------------------------------------------- sparse teacher


@pytest.mark.parametrize("name", DISTRIBUTION_DIVERGENCES)
@FAST
@given(pair=logit_pairs(torch.float64), temperature=st.floats(0.5, 4.0))
def test_topk_teacher_with_k_equal_v_equals_dense(name, pair, temperature):
    s, t = pair
    sparse = TopKTeacher.from_logits(t, k=t.shape[-1])
    torch.testing.assert_close(
        call(name, s, sparse, temperature=temperature, beta=0.3, skew_alpha=0.2),
        call(name, s, t, temperature=temperature, beta=0.3, skew_alpha=0.2),
    )


@pytest.mark.parametrize("name", DISTRIBUTION_DIVERGENCES)
@FAST
@given(pair=logit_pairs(torch.float64), data=st.data())
def test_topk_teacher_with_small_k_is_a_coarsening(name, pair, data):
    # at T = 1 the top-k teacher is the dense one with the tail merged into one category, and
    # merging categories can only shrink an f-divergence (data processing inequality)
    s, t = pair
    k = data.draw(st.integers(1, t.shape[-1]))
    sparse = TopKTeacher.from_logits(t, k=k)
    # a residual below MIN_RESIDUAL is floored (so a reverse KL stays finite): no longer an exact coarsening
    assume(k == t.shape[-1] or bool((sparse.residual_mass() > 100 * MIN_RESIDUAL).all()))
    coarse = call(name, s, sparse, beta=0.3, skew_alpha=0.2).item()
    assert -1e-9 <= coarse <= call(name, s, t, beta=0.3, skew_alpha=0.2).item() + 1e-9


def test_topk_teacher_validation():
    with pytest.raises(ValueError, match="same shape"):
        TopKTeacher(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="vocabulary"):
        forward_kl(torch.randn(2, 3), TopKTeacher.from_logits(torch.randn(2, 5), k=4))
    with pytest.raises(ValueError, match="one dense teacher"):
        DIVERGENCES["logit_mse"](torch.randn(2, 5), TopKTeacher.from_logits(torch.randn(2, 5), k=2))


# --------------------------------------------------------------------------- multi-teacher


def test_ensemble_is_a_weighted_average_of_probabilities():
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    t1, t2 = (
        torch.randn(4, 8, generator=gen, dtype=torch.float64),
        torch.randn(4, 8, generator=gen, dtype=torch.float64),
    )
    temperature = 2.0
    p = 0.25 * torch.softmax(t1 / temperature, -1) + 0.75 * torch.softmax(t2 / temperature, -1)
    log_q = torch.log_softmax(s / temperature, -1)
    expected = (p * (p.log() - log_q)).sum(-1).mean()
    got = forward_kl(s, TeacherEnsemble([t1, t2], weights=[1.0, 3.0]), temperature=temperature)
    torch.testing.assert_close(got, expected)
    # a list of tensors is an ensemble too; equal weights by default; one teacher is itself
    mix = DistillMix(alpha=1.0, temperature=temperature)
    torch.testing.assert_close(distill_loss(s, TeacherEnsemble([t1, t2], [1, 3]), mix=mix).kd, expected)
    torch.testing.assert_close(distill_loss(s, [t1, t2], mix=mix).kd, distill_loss(s, TeacherEnsemble([t1, t2]), mix=mix).kd)
    torch.testing.assert_close(forward_kl(s, TeacherEnsemble([t1, t1])), forward_kl(s, t1))


def test_ensemble_vocab_mismatch_is_a_clear_error():
    s = torch.randn(3, 10)
    with pytest.raises(
        VocabSizeMismatch, match=r"teacher 1 of the ensemble has a vocabulary of 12 tokens but the student has 10"
    ):
        forward_kl(s, TeacherEnsemble([torch.randn(3, 10), torch.randn(3, 12)]))
    with pytest.raises(VocabSizeMismatch, match="share the student's vocabulary"):
        forward_kl(s, torch.randn(3, 11))
    with pytest.raises(ValueError, match="one weight per teacher"):
        TeacherEnsemble([torch.randn(3, 10)] * 2, weights=[1.0])
    with pytest.raises(ValueError, match="positive"):
        TeacherEnsemble([torch.randn(3, 10)] * 2, weights=[1.0, -1.0])


# ------------------------------------------------------------------------------ LossConfig


def test_loss_config_defaults():
    cfg = LossConfig()
    assert (cfg.divergence, cfg.temperature, cfg.alpha, cfg.beta, cfg.skew_alpha) == ("forward_kl", 2.0, 0.5, 0.5, 0.1)
    assert cfg.chunk_size == 1024 and cfg.chunked is True
    assert cfg.hidden is None and cfg.step_by_step is None and cfg.teacher_weights is None


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("temperature", 0, "greater than 0"),
        ("temperature", -1.0, "greater than 0"),
        ("alpha", 1.5, "less than or equal to 1"),
        ("alpha", -0.1, "greater than or equal to 0"),
        ("beta", 2, "less than or equal to 1"),
        ("skew_alpha", -1, "greater than or equal to 0"),
        ("chunk_size", 0, "greater than 0"),
        ("divergence", "kl", "'forward_kl'"),
    ],
)
def test_loss_config_errors_name_the_field_and_what_is_allowed(field, value, allowed):
    with pytest.raises(ValidationError) as err:
        LossConfig(**{field: value})
    message = str(err.value)
    assert field in message and allowed in message


def test_loss_config_rejects_unknown_and_inconsistent_fields():
    with pytest.raises(ValidationError, match="temprature"):
        LossConfig(temprature=2.0)
    with pytest.raises(ValidationError, match="teacher_weights are all 0"):
        LossConfig(teacher_weights=[0.0, 0.0])
    with pytest.raises(ValidationError, match="teacher_weights"):
        LossConfig(teacher_weights=[1.0, -1.0])
    assert LossConfig(teacher_weights=[1.0, 0.0]).teacher_weights == [1.0, 0.0]  # 0 leaves a teacher out
    with pytest.raises(ValidationError, match="filter_size is only used with projection='ted'"):
        LossConfig(hidden={"filter_size": 64})
    with pytest.raises(ValidationError, match="both 0"):
        LossConfig(step_by_step={"label_weight": 0, "rationale_weight": 0})
    with pytest.raises(ValidationError, match="layer_map"):
        LossConfig(hidden={"layer_map": [[1, -2]]})


def test_loss_config_from_yaml_like_data():
    cfg = LossConfig.model_validate(
        {
            "divergence": "generalized_jsd",
            "beta": 0.9,
            "temperature": 1.0,
            "teacher_weights": [2, 1],
            "hidden": {"weight": 0.5, "layer_map": [[1, 2], [2, 4]], "loss": "cosine", "projection": "linear"},
            "step_by_step": {"rationale_weight": 0.5},
        }
    )
    assert cfg.hidden is not None and cfg.hidden.layer_map == [(1, 2), (2, 4)]
    assert cfg.step_by_step is not None and cfg.step_by_step.label_weight == 1.0
    assert all(field.description for field in LossConfig.model_fields.values())


def test_teacher_is_a_constant():
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5, requires_grad=True)
    for name in DIVERGENCE_NAMES:
        call(name, s, t, temperature=2.0).backward()
    assert t.grad is None and s.grad is not None
