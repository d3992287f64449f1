"""The chunked fused path equals the plain reference, forward and gradients (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mydistill.losses import (
    DIVERGENCES,
    DenseLogits,
    DistillMix,
    HiddenHead,
    TeacherEnsemble,
    TopKTeacher,
    VocabSizeMismatch,
    auto_chunk_size,
    chunked_cross_entropy,
    chunked_distill_loss,
    chunked_divergence,
    distill_loss,
    teacher_from_parts,
)
from mydistill.losses.chunked import hand_fused
from mydistill.losses.divergences import DIVERGENCE_NAMES, divergence_kwargs

TOL = {"atol": 1e-5, "rtol": 1e-5}
FAST = settings(max_examples=6, deadline=None)
TEACHER_KINDS = ["logits", "hidden", "topk", "topk_full", "ensemble_logits", "ensemble_hidden"]


def make_case(
    seed: int, n: int, vocab: int, width: int, *, bias: bool, invalid_fraction: float = 0.3, dtype=torch.float32
):
    gen = torch.Generator().manual_seed(seed)
    case = {
        "h": torch.randn(n, width, generator=gen).to(dtype),
        "w": (torch.randn(vocab, width, generator=gen) * width**-0.5 * 2).to(dtype),
        "b": (torch.randn(vocab, generator=gen) * 0.1).to(dtype) if bias else None,
        "th": [torch.randn(n, width + 3, generator=gen).to(dtype) for _ in range(2)],
        "tw": [(torch.randn(vocab, width + 3, generator=gen) * 0.6).to(dtype) for _ in range(2)],
        "labels": torch.randint(0, vocab, (n,), generator=gen),
    }
    drop = torch.rand(n, generator=gen) < invalid_fraction
    case["labels"][drop] = -100
    return case


def teacher_args(case, kind: str, k: int):
    """(the teacher signal for chunked_distill_loss, the logits-based teacher for the plain distill_loss)."""
    t_logits = [th @ tw.T for th, tw in zip(case["th"], case["tw"], strict=True)]
    heads = [HiddenHead(th, tw) for th, tw in zip(case["th"], case["tw"], strict=True)]
    if kind == "logits":
        return t_logits[0], t_logits[0]
    if kind == "hidden":
        return heads[0], t_logits[0]
    if kind in ("topk", "topk_full"):
        topk = TopKTeacher.from_logits(t_logits[0], k=k if kind == "topk" else t_logits[0].shape[-1])
        return topk, topk
    if kind == "ensemble_logits":
        return TeacherEnsemble(t_logits, [0.3, 0.7]), TeacherEnsemble(t_logits, [0.3, 0.7])
    if kind == "ensemble_hidden":
        return TeacherEnsemble(heads, [0.3, 0.7]), TeacherEnsemble(t_logits, [0.3, 0.7])
    raise AssertionError(kind)


def run_plain(case, teacher, **kw):
    h = case["h"].clone().requires_grad_()
    w = case["w"].clone().requires_grad_()
    b = None if case["b"] is None else case["b"].clone().requires_grad_()
    parts = distill_loss(
        F.linear(h, w, b), teacher, labels=case["labels"], mix=DistillMix(**kw), compute_agreement=teacher is not None
    )
    parts.loss.backward()
    return parts, (h.grad, w.grad, None if b is None else b.grad)


def run_chunked(case, teacher, chunk_size, **kw):
    h = case["h"].clone().requires_grad_()
    w = case["w"].clone().requires_grad_()
    b = None if case["b"] is None else case["b"].clone().requires_grad_()
    parts = chunked_distill_loss(
        h,
        w,
        teacher,
        labels=case["labels"],
        mix=DistillMix(**kw),
        student_bias=b,
        chunk_size=chunk_size,
        compute_agreement=teacher is not None,
    )
    parts.loss.backward()
    return parts, (h.grad, w.grad, None if b is None else b.grad)


def assert_same(plain, chunked):
    (p_parts, p_grads), (c_parts, c_grads) = plain, chunked
    torch.testing.assert_close(c_parts.loss, p_parts.loss, **TOL)
    torch.testing.assert_close(c_parts.kd.to(p_parts.kd.dtype), p_parts.kd, **TOL)
    torch.testing.assert_close(c_parts.ce.to(p_parts.ce.dtype), p_parts.ce, **TOL)
    assert int(c_parts.num_tokens) == int(p_parts.num_tokens)
    if p_parts.teacher_agreement is not None:
        torch.testing.assert_close(
            c_parts.teacher_agreement.to(p_parts.teacher_agreement.dtype), p_parts.teacher_agreement
        )
    for p_grad, c_grad in zip(p_grads, c_grads, strict=True):
        if p_grad is None:
            assert c_grad is None
        else:
            torch.testing.assert_close(c_grad, p_grad, **TOL)


# logit_mse compares raw logits, so only a single dense teacher applies to it
PAIRS = [
    (name, kind)
    for name in DIVERGENCE_NAMES
    for kind in TEACHER_KINDS
    if name != "logit_mse" or kind in ("logits", "hidden")
]


@pytest.mark.parametrize(("name", "kind"), PAIRS)
@FAST
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 24),
    vocab=st.integers(3, 40),
    chunk_size=st.integers(1, 30),
    temperature=st.sampled_from([0.5, 1.0, 2.0, 3.7]),
    alpha=st.sampled_from([0.0, 0.3, 1.0]),
    bias=st.booleans(),
    data=st.data(),
)
def test_chunked_equals_plain(name, kind, seed, n, vocab, chunk_size, temperature, alpha, bias, data):
    case = make_case(seed, n, vocab, width=8, bias=bias)
    k = data.draw(st.integers(1, vocab))
    signal, teacher = teacher_args(case, kind, k)
    kw = {"divergence": name, "temperature": temperature, "alpha": alpha, "beta": 0.35, "skew_alpha": 0.2}
    assert_same(run_plain(case, teacher, **kw), run_chunked(case, signal, chunk_size, **kw))


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_chunked_divergence_equals_the_registry_function(name):
    case = make_case(7, 19, 23, 6, bias=True)
    logits = [th @ tw.T for th, tw in zip(case["th"], case["tw"], strict=True)]
    params = divergence_kwargs(name, beta=0.7, skew_alpha=0.3)
    h = case["h"].clone().requires_grad_()
    w = case["w"].clone().requires_grad_()
    plain = DIVERGENCES[name](F.linear(h, w, case["b"]), logits[0], labels=case["labels"], temperature=2.0, **params)
    plain.backward()
    h2 = case["h"].clone().requires_grad_()
    w2 = case["w"].clone().requires_grad_()
    chunked = chunked_divergence(
        name,
        h2,
        w2,
        logits[0],
        student_bias=case["b"],
        labels=case["labels"],
        temperature=2.0,
        chunk_size=5,
        **params,
    )
    chunked.backward()
    torch.testing.assert_close(chunked, plain, **TOL)
    torch.testing.assert_close(h2.grad, h.grad, **TOL)
    torch.testing.assert_close(w2.grad, w.grad, **TOL)


@pytest.mark.parametrize("name", ["forward_kl", "generalized_jsd", "skew_reverse_kl"])
def test_chunked_matches_plain_in_float64_tightly(name):
    case = make_case(3, 17, 29, 5, bias=True, dtype=torch.float64)
    signal, teacher = teacher_args(case, "topk", k=9)
    kw = {"divergence": name, "temperature": 1.7, "alpha": 0.6, "beta": 0.4, "skew_alpha": 0.1}
    plain, chunked = run_plain(case, teacher, **kw), run_chunked(case, signal, 4, **kw)
    torch.testing.assert_close(chunked[0].loss, plain[0].loss, atol=1e-12, rtol=1e-12)
    for c, p in zip(chunked[1], plain[1], strict=True):
        torch.testing.assert_close(c, p, atol=1e-12, rtol=1e-12)


@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(1, 30), vocab=st.integers(2, 50), chunk_size=st.integers(1, 40))
def test_chunked_cross_entropy_alone(seed, n, vocab, chunk_size):
    case = make_case(seed, n, vocab, 8, bias=True)
    h = case["h"].clone().requires_grad_()
    w = case["w"].clone().requires_grad_()
    ref = F.cross_entropy(F.linear(h, w, case["b"]), case["labels"], ignore_index=-100)
    if not (case["labels"] != -100).any():
        ref = ref.nan_to_num(0.0)  # PyTorch's mean over zero tokens is nan; ours is 0
    ref.backward()
    h2 = case["h"].clone().requires_grad_()
    w2 = case["w"].clone().requires_grad_()
    got = chunked_cross_entropy(h2, w2, case["labels"], case["b"], chunk_size=chunk_size)
    got.backward()
    torch.testing.assert_close(got, ref, **TOL)
    torch.testing.assert_close(h2.grad, h.grad.nan_to_num(0.0), **TOL)
    torch.testing.assert_close(w2.grad, w.grad.nan_to_num(0.0), **TOL)


def test_identical_student_and_teacher_give_zero_kd():
    case = make_case(1, 12, 17, 6, bias=False)
    for name in DIVERGENCE_NAMES:
        parts = chunked_distill_loss(
            case["h"],
            case["w"],
            HiddenHead(case["h"], case["w"]),
            mix=DistillMix(name, temperature=2.0, alpha=1.0),
            chunk_size=5,
        )
        assert abs(parts.loss.item()) < 1e-6, name
        assert parts.teacher_agreement is None


def test_zero_valid_tokens_gives_zero_loss_and_zero_gradients():
    case = make_case(2, 6, 9, 4, bias=True)
    case["labels"][:] = -100
    h = case["h"].clone().requires_grad_()
    w = case["w"].clone().requires_grad_()
    b = case["b"].clone().requires_grad_()
    parts = chunked_distill_loss(
        h, w, torch.randn(6, 9), labels=case["labels"], mix=DistillMix(temperature=2.0), student_bias=b
    )
    assert parts.loss.item() == 0.0 and parts.num_tokens.item() == 0
    parts.loss.backward()
    for g in (h.grad, w.grad, b.grad):
        assert torch.equal(g, torch.zeros_like(g))


def test_backward_scales_with_the_incoming_gradient_and_leaves_the_teacher_alone():
    case = make_case(4, 10, 13, 6, bias=False)
    t_logits = torch.randn(10, 13, requires_grad=True)
    grads = []
    for scale in (1.0, 3.0):
        h = case["h"].clone().requires_grad_()
        loss = chunked_distill_loss(h, case["w"], t_logits, labels=case["labels"], chunk_size=3).loss
        (scale * loss).backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[1], 3.0 * grads[0])
    assert t_logits.grad is None


def test_no_grad_and_grad_paths_agree_and_leading_dims_flatten():
    case = make_case(5, 12, 11, 6, bias=True)
    t_logits = torch.randn(12, 11)
    with torch.no_grad():
        a = chunked_distill_loss(case["h"], case["w"], t_logits, labels=case["labels"], student_bias=case["b"]).loss
    b = chunked_distill_loss(
        case["h"].reshape(3, 4, 6).requires_grad_(),
        case["w"],
        t_logits.reshape(3, 4, 11),
        labels=case["labels"].reshape(3, 4),
        student_bias=case["b"],
        chunk_size=5,
    ).loss
    torch.testing.assert_close(a, b.detach(), **TOL)


def test_bfloat16_inputs_run_in_fp32_and_stay_close():
    case = make_case(6, 16, 32, 8, bias=True)
    t_logits = torch.randn(16, 32)
    mix = DistillMix(temperature=2.0)
    ref = chunked_distill_loss(case["h"], case["w"], t_logits, labels=case["labels"], mix=mix, student_bias=case["b"]).loss
    h = case["h"].bfloat16().requires_grad_()
    w = case["w"].bfloat16().requires_grad_()
    low = chunked_distill_loss(
        h, w, t_logits.bfloat16(), labels=case["labels"], mix=mix, student_bias=case["b"].bfloat16()
    )
    low.loss.backward()
    assert low.loss.dtype == torch.float32
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert torch.isfinite(w.grad.float()).all()
    torch.testing.assert_close(low.loss, ref, atol=5e-2, rtol=5e-2)


def test_input_errors_are_clear():
    case = make_case(0, 4, 9, 4, bias=False)
    h, w, labels = case["h"], case["w"], case["labels"]
    with pytest.raises(VocabSizeMismatch, match="teacher 1 of the ensemble has a vocabulary of 10"):
        chunked_distill_loss(h, w, [torch.randn(4, 9), torch.randn(4, 10)], labels=labels)
    with pytest.raises(VocabSizeMismatch, match="the teacher has a vocabulary of 12"):
        chunked_distill_loss(h, w, HiddenHead(torch.randn(4, 3), torch.randn(12, 3)), labels=labels)
    with pytest.raises(ValueError, match="one teacher signal"):
        teacher_from_parts(logits=torch.randn(4, 9), topk=TopKTeacher.from_logits(torch.randn(4, 9), 3))
    with pytest.raises(ValueError, match="one dense teacher"):
        chunked_distill_loss(
            h, w, TopKTeacher.from_logits(torch.randn(4, 9), 3), labels=labels, mix=DistillMix("logit_mse")
        )
    with pytest.raises(ValueError, match="needs labels"):
        chunked_distill_loss(h, w)
    with pytest.raises(ValueError, match="positions"):
        chunked_distill_loss(h, w, torch.randn(5, 9), labels=labels)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_distill_loss(h, w, labels=labels, chunk_size=0)


@pytest.mark.parametrize("name", ["forward_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl", "tvd"])
def test_teacher_with_excluded_tokens_matches_plain_and_is_finite(name):
    # -inf teacher logits (p = 0): the chunked in-place math must keep 0 * log 0 = 0 like the plain path
    case = make_case(8, 9, 12, 5, bias=False)
    t_logits = case["th"][0] @ case["tw"][0].T
    t_logits[:, :3] = -torch.inf
    kw = {"divergence": name, "temperature": 1.5, "alpha": 0.8, "beta": 0.4, "skew_alpha": 0.1}
    plain = run_plain(case, t_logits, **kw)
    chunked = run_chunked(case, t_logits, 4, **kw)
    assert torch.isfinite(chunked[0].loss) and all(torch.isfinite(g).all() for g in chunked[1] if g is not None)
    assert_same(plain, chunked)


@pytest.mark.parametrize("kind", ["logits", "hidden", "ensemble_hidden"])
def test_hand_fused_forward_kl_equals_its_autograd_form(kind):
    # forward_kl's hand-fused rows + gradient against autograd of the same table row, per chunk
    case = make_case(11, 21, 37, 8, bias=True)
    signal, teacher = teacher_args(case, kind, k=5)
    kw = {"divergence": "forward_kl", "temperature": 1.7, "alpha": 0.6}
    fused = run_chunked(case, signal, 4, **kw)
    with hand_fused(False):
        derived = run_chunked(case, signal, 4, **kw)
    assert_same(derived, fused)
    assert_same(run_plain(case, teacher, **kw), derived)


def _allocations(fn) -> list[tuple[int, str]]:
    """Every CPU allocation made while ``fn`` runs (the torch profiler's memory events): its bytes and
    the innermost operator it was made in."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = list(prof.profiler.kineto_results.events())
    ops = [e for e in events if e.name() != "[memory]"]

    def innermost(t: int) -> str:
        around = [o for o in ops if o.start_ns() <= t <= o.start_ns() + o.duration_ns()]
        return min(around, key=lambda o: o.duration_ns()).name() if around else ""

    return [
        (e.nbytes(), innermost(e.start_ns()))
        for e in events
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU and e.nbytes() > 0
    ]


def _bf16_addmm_scratch_bytes(rows: int, cols: int, inner: int) -> int:
    """The largest buffer torch's own in-place bf16 ``addmm_`` allocates here: 0 where the CPU
    multiplies bf16 natively; an fp32 copy of the output where it does not (no AVX512-BF16/AMX)."""
    out = torch.zeros(rows, cols, dtype=torch.bfloat16)
    a, b = torch.ones(rows, inner, dtype=torch.bfloat16), torch.ones(inner, cols, dtype=torch.bfloat16)
    return max((n for n, op in _allocations(lambda: out.addmm_(a, b)) if op == "aten::addmm_"), default=0)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


@pytest.mark.parametrize("divergence", ["forward_kl", "generalized_jsd"])
def test_bf16_chunked_matches_fp32_plain_without_fp32_vocab_buffers(divergence):
    """bf16 head and hidden states in: loss and gradients within 1e-2 (relative, Frobenius) of the fp32
    plain path on the same bf16 values, and no allocation as large as an fp32 (V, H) head or (N, V) logits."""
    n, vocab, width, chunk = 96, 1000, 64, 16
    gen = torch.Generator().manual_seed(12)
    h = torch.randn(n, width, generator=gen).bfloat16()
    w = (torch.randn(vocab, width, generator=gen) * width**-0.5 * 3).bfloat16()
    th = torch.randn(n, 48, generator=gen).bfloat16()
    tw = (torch.randn(vocab, 48, generator=gen) * 0.4).bfloat16()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::7] = -100
    mix = DistillMix(divergence, temperature=2.0, alpha=0.7)

    h32, w32 = h.float().requires_grad_(), w.float().requires_grad_()
    ref = distill_loss(h32 @ w32.T, th.float() @ tw.float().T, labels=labels, mix=mix)
    ref.loss.backward()

    h16, w16 = h.clone().requires_grad_(), w.clone().requires_grad_()
    out: dict[str, object] = {}

    def step() -> None:
        parts = chunked_distill_loss(h16, w16, HiddenHead(th, tw), labels=labels, mix=mix, chunk_size=chunk)
        out["saved"] = [t.dtype for t in parts.loss.grad_fn.saved_tensors if t is not None]
        parts.loss.backward()
        out["loss"] = parts.loss.detach()

    allocations = _allocations(step)
    assert out["saved"] == [torch.bfloat16, torch.bfloat16]  # d hidden, d head: kept in bf16, no fp32 copies
    assert h16.grad.dtype == w16.grad.dtype == torch.bfloat16
    # On a CPU without native bf16 matmul, torch's in-place addmm_ (the head gradient, accumulated per
    # chunk) makes a transient fp32 copy of its (V, H) output inside the kernel; that one is torch's,
    # probed alone here, and left out. Every buffer our code allocates stays below fp32 (V, H) / (N, V).
    scratch = _bf16_addmm_scratch_bytes(vocab, width, chunk)
    sizes = [b for b, op in allocations if not (scratch and op == "aten::addmm_" and b <= scratch)]
    assert max(sizes) < min(vocab * width, n * vocab) * 4, "an fp32 (V, H) or (N, V) buffer was allocated"
    assert max(sizes) >= chunk * vocab * 4  # the profiler did see the (chunk, V) fp32 work buffers
    want = float(ref.loss.detach())
    assert abs(float(out["loss"]) - want) <= 1e-2 * abs(want)
    assert _relative_error(h16.grad, h32.grad) < 1e-2
    assert _relative_error(w16.grad, w32.grad) < 1e-2


def test_chunk_size_is_chosen_from_the_shapes():
    head = torch.empty(50, 4096, dtype=torch.bfloat16)
    assert auto_chunk_size(100_000, head) == 512  # 4 x (512, V) fp32 = the (V, 4096) bf16 head
    assert auto_chunk_size(100_000, head.float()) == 1024
    assert auto_chunk_size(100_000, torch.empty(50, 8)) == 16  # the floor
    assert auto_chunk_size(7, head) == 7  # never more rows than there are
    case = make_case(9, 40, 23, 8, bias=False)
    signal, teacher = teacher_args(case, "hidden", k=1)
    assert_same(run_plain(case, teacher, alpha=0.5), run_chunked(case, signal, None, alpha=0.5))


def test_zero_weight_teacher_is_left_out_of_the_signal():
    a, b = torch.randn(4, 9), torch.randn(4, 9)
    single = teacher_from_parts(logits=[a, b], weights=[2.0, 0.0])
    assert isinstance(single, DenseLogits) and single.logits is a
    both = teacher_from_parts(hidden=[a, b], head_weight=[torch.randn(5, 9)] * 2, weights=[1.0, 3.0])
    assert isinstance(both, TeacherEnsemble) and list(both.weights) == [1.0, 3.0]
