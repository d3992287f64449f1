"""Top-k vs the unbiased sampled signal, and several sparse teachers mixed per token."""

import pytest
import torch

from mydistill.losses import DistillMix, TeacherEnsemble, TopKTeacher, distill_loss
from mydistill.signal import combine_topk, sparsify
from mydistill.signal.teacher import pretempered


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 80, generator=g, dtype=torch.float64) * 2.5


def test_topk_mode_is_the_loss_librarys_top_k_teacher(logits):
    signal = sparsify(logits, 10)
    reference = TopKTeacher.from_logits(logits.float(), 10)
    assert torch.equal(signal.token_ids, reference.token_ids)
    assert torch.allclose(signal.log_probs, reference.log_probs) and torch.allclose(signal.residual, reference.residual)


def test_sampled_mode_lists_distinct_tokens_whose_masses_sum_to_one(logits):
    signal = sparsify(logits, 8, mode="sampled", sampled_tokens=12, generator=torch.Generator().manual_seed(1))
    assert signal.token_ids.shape == (6, 20)
    assert all(len(set(row.tolist())) == 20 for row in signal.token_ids)
    assert torch.allclose(signal.log_probs.exp().sum(-1), torch.ones(6), atol=1e-5)
    assert torch.equal(signal.residual, torch.zeros(6))
    top = TopKTeacher.from_logits(logits.float(), 8)
    assert torch.equal(signal.token_ids[:, :8], top.token_ids)  # the head is kept exactly
    assert sparsify(logits, 70, mode="sampled", sampled_tokens=50).token_ids.shape == (6, 80)  # capped at V


def dense_estimate(signal, vocab):
    """The per-token probabilities a sparse signal implies, spreading its residual evenly (as the loss does)."""
    k = signal.token_ids.shape[-1]
    spread = (signal.residual / (vocab - k)).unsqueeze(-1).expand(-1, vocab).clone()
    return spread.scatter(-1, signal.token_ids, signal.log_probs.exp())


def forward_kl_grad(student, teacher_probs):
    """d KL(p || softmax(s)) / d s = softmax(s) - p."""
    return torch.softmax(student, -1) - teacher_probs


def test_sampled_signal_is_unbiased_where_top_k_is_not(logits):
    """E[p̂] = p for every token, so the forward-KL gradient is right on average (arXiv 2503.16870 §3)."""
    vocab = logits.shape[-1]
    p = torch.softmax(logits.float(), -1)
    student = torch.zeros(6, vocab)
    g = torch.Generator().manual_seed(2)
    draws = 3000  # independent signals for every row, in one call
    signals = sparsify(logits.repeat(draws, 1), 4, mode="sampled", sampled_tokens=6, generator=g)
    mean = dense_estimate(signals, vocab).reshape(draws, *p.shape).mean(0)
    top_k = dense_estimate(sparsify(logits, 10), vocab)  # more slots than the sampled signal's 4 + 6
    sampled_error = (forward_kl_grad(student, mean) - forward_kl_grad(student, p)).abs().max()
    top_k_error = (forward_kl_grad(student, top_k) - forward_kl_grad(student, p)).abs().max()
    assert sampled_error < 0.004  # Monte Carlo noise only (1/sqrt(3000))
    assert top_k_error > 5 * sampled_error  # a bias no amount of data removes


def test_sampled_signal_in_the_loss_library(logits):
    """A sampled teacher goes through TopKTeacher like any other; its forward KL is finite."""
    signal = sparsify(logits, 8, mode="sampled", sampled_tokens=8, generator=torch.Generator().manual_seed(3))
    teacher = TopKTeacher(signal.token_ids, signal.log_probs, signal.residual)
    student = torch.randn(6, 80, requires_grad=True)
    loss = distill_loss(student, teacher, mix=DistillMix("forward_kl", temperature=1.0, alpha=1.0)).loss
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


# ----------------------------------------------------------------------------------------------
# combining stores


def test_one_teacher_is_returned_as_is(logits):
    teacher = TopKTeacher.from_logits(logits, 5)
    assert combine_topk([teacher], None, temperature=2.0, vocab_size=80) is teacher


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "generalized_jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_lossless_teachers_combine_to_the_dense_ensemble(logits, divergence, temperature):
    other = torch.randn(6, 80, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2.5
    student = torch.randn(6, 80, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    teachers = [TopKTeacher.from_logits(logits, 80), TopKTeacher.from_logits(other, 80)]
    combined = combine_topk(teachers, [3, 1], temperature=temperature, vocab_size=80)
    got = distill_loss(student, combined, mix=DistillMix(divergence, temperature=temperature, alpha=1.0)).loss
    want = distill_loss(
        student, TeacherEnsemble([logits, other], [3, 1]), mix=DistillMix(divergence, temperature=temperature, alpha=1.0)
    ).loss
    assert got.item() == pytest.approx(want.item(), rel=1e-9)


def test_identical_sparse_teachers_combine_to_the_same_teacher(logits):
    student = torch.randn(6, 80, dtype=torch.float64)
    teacher = TopKTeacher.from_logits(logits, 7)
    combined = combine_topk([teacher, teacher], [1, 4], temperature=2.0, vocab_size=80)
    assert combined.k == 7
    for divergence in ("forward_kl", "reverse_kl"):
        a = distill_loss(student, combined, mix=DistillMix(divergence, temperature=2.0, alpha=1.0)).loss
        b = distill_loss(student, teacher, mix=DistillMix(divergence, temperature=2.0, alpha=1.0)).loss
        assert a.item() == pytest.approx(b.item(), rel=1e-9)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_sparse_teachers_mix_with_the_tail_assumption(logits, temperature):
    """Each listed token gets Σ w_i p_i, a token a teacher does not list gets its even tail share."""
    vocab = 80
    other = logits.clone()
    other[:3] = torch.randn(3, vocab, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2.5
    a, b = TopKTeacher.from_logits(logits, 6), TopKTeacher.from_logits(other, 6)
    combined = combine_topk([a, b], [1, 2], temperature=temperature, vocab_size=vocab)
    # rows 3..5: both teachers list the same tokens, rows 0..2 mostly different ones: the width is
    # the largest union and narrower rows are padded with distinct unlisted tokens
    assert 6 < combined.k <= 12
    assert all(len(set(row.tolist())) == combined.k for row in combined.token_ids)

    def tempered_dense(t):
        cat = t.category_log_probs(temperature, vocab).exp()
        dense = (cat[:, -1:] / (vocab - t.k)).expand(-1, vocab).clone()
        return dense.scatter(-1, t.token_ids, cat[:, : t.k])

    want = (tempered_dense(a) + 2 * tempered_dense(b)) / 3
    got = combined.category_log_probs(temperature, vocab).exp()
    assert torch.allclose(got[:, : combined.k], want.gather(-1, combined.token_ids), rtol=1e-9, atol=1e-12)
    rest = 1 - want.gather(-1, combined.token_ids).sum(-1)
    assert torch.allclose(got[:, -1], rest, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("temperature", [2.0, 4.0])
def test_a_store_at_the_loss_temperature_reaches_the_loss_exactly(logits, temperature):
    """Stored at T, the loss (which tempers at T) sees the tempered top-k and the exact tempered tail mass."""
    vocab, k = 80, 6
    stored = sparsify(logits, k, temperature=temperature)
    teacher = pretempered(TopKTeacher(stored.token_ids, stored.log_probs, stored.residual), temperature, vocab)
    cat = teacher.category_log_probs(temperature, vocab)
    p_t = torch.log_softmax(logits.float() / temperature, -1)
    assert torch.allclose(cat[:, :k], p_t.gather(-1, stored.token_ids), atol=1e-5)
    tail = torch.logsumexp(p_t.scatter(-1, stored.token_ids, -torch.inf), -1)
    assert torch.allclose(cat[:, k], tail, atol=1e-5)
    # a store at T = 1 re-tempered by the loss has to guess that tail (even spread): it is off
    at_one = TopKTeacher.from_logits(logits, k).category_log_probs(temperature, vocab)
    assert (at_one[:, k] - tail).abs().max() > 0.05


def test_a_sampled_store_at_the_loss_temperature_is_unbiased_there(logits):
    temperature, vocab = 2.0, 80
    g = torch.Generator().manual_seed(7)
    draws = 2000
    signals = sparsify(logits.repeat(draws, 1), 4, mode="sampled", sampled_tokens=6, temperature=temperature, generator=g)
    teacher = pretempered(TopKTeacher(signals.token_ids, signals.log_probs, signals.residual), temperature, vocab)
    cat = teacher.category_log_probs(temperature, vocab).exp()  # what the loss uses, per draw
    assert cat[:, -1].max() < 1e-9  # no invented tail
    dense = torch.zeros(cat.shape[0], vocab, dtype=cat.dtype).scatter(-1, teacher.token_ids, cat[:, :-1])
    mean = dense.reshape(draws, *logits.shape).mean(0)
    assert (mean - torch.softmax(logits.float() / temperature, -1)).abs().max() < 0.006
