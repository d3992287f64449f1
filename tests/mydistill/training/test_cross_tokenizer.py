"""Tokenizer agreement checks, the ULD loss, and distillation across two different tokenizers."""

import pytest
import torch

from mydistill.config import CrossTokenizerConfig
from mydistill.training.cross_tokenizer import (
    TokenizerMismatch,
    aligned_response_rows,
    check_tokenizers_agree,
    collate_teacher,
    compare_tokenizers,
    teacher_examples,
    uld_batch_loss,
)
from mydistill.losses import DistillObjective, LossConfig
from mydistill.losses.uld import uld_loss
from mydistill.models import VocabularyMismatch, build_model
from mydistill.tokenization import IGNORE_INDEX, collate, shift_labels, tokenize_example, tokenizer_sha256

from tests.conftest import TINY_ARCH


def merged_tokenizer(vocab_size=330, texts=None):
    """A second tokenizer: byte-level BPE *with* merges, its own ids; trained on the demo task's
    corpus unless ``texts`` are given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mydistill.demo.task import corpus_for_tokenizer
    from mydistill.demo.tokenizer import CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|end|>", "<|user|>", "<|assistant|>", "<|pad|>"]  # other order: other ids
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_for_tokenizer() if texts is None else texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>", chat_template=CHAT_TEMPLATE, padding_side="right"
    )


# ----------------------------------------------------------------------------------------------
# checks


def test_tokenizer_hash_survives_save_and_load_and_sees_template_changes(tmp_path, demo_tokenizer):
    from transformers import AutoTokenizer

    demo_tokenizer.save_pretrained(tmp_path)
    assert tokenizer_sha256(AutoTokenizer.from_pretrained(tmp_path)) == tokenizer_sha256(demo_tokenizer)
    assert tokenizer_sha256(merged_tokenizer()) != tokenizer_sha256(demo_tokenizer)
    changed = AutoTokenizer.from_pretrained(tmp_path)
    changed.chat_template = "{{ messages[0]['content'] }}"
    assert tokenizer_sha256(changed) != tokenizer_sha256(demo_tokenizer)


def test_same_tokenizer_agrees(demo_tokenizer):
    comparison = check_tokenizers_agree(demo_tokenizer, demo_tokenizer)
    assert comparison.agree and comparison.same_vocabulary


def test_different_tokenizers_stop_training_with_how_and_what_to_do(demo_tokenizer):
    with pytest.raises(TokenizerMismatch) as err:
        check_tokenizers_agree(demo_tokenizer, merged_tokenizer())
    assert isinstance(err.value, VocabularyMismatch)  # callers catching the old error still do
    message = str(err.value)
    assert "teacher has 261 tokens, student 330" in message
    assert "only in the student" in message and "shared tokens with other ids" in message
    assert "the same text becomes other ids" in message
    assert "distill.cross_tokenizer.method" in message and "'uld'" in message and "'sequence'" in message
    comparison = check_tokenizers_agree(demo_tokenizer, merged_tokenizer(), method="uld")
    assert not comparison.agree


def test_same_strings_under_other_ids_is_a_mismatch(demo_tokenizer):
    """Equal sizes and equal token sets are not enough: ids must mean the same strings."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    import json

    spec = json.loads(demo_tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    swapped = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token="<|pad|>", eos_token="<|end|>",
        chat_template=demo_tokenizer.chat_template,
    )
    assert len(swapped) == len(demo_tokenizer)
    comparison = compare_tokenizers(demo_tokenizer, swapped)
    assert not comparison.agree and comparison.counts["moved"] == 2
    assert "'a': teacher" in comparison.describe()


# ----------------------------------------------------------------------------------------------
# the ULD loss


def test_uld_is_zero_for_identical_and_permutation_invariant():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 30, generator=g, dtype=torch.float64)
    assert uld_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-12)
    assert uld_loss(logits[:, torch.randperm(30, generator=g)], logits).item() == pytest.approx(0.0, abs=1e-12)


def test_uld_matches_the_sorted_l1_formula_across_vocabulary_sizes():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)
    p = torch.softmax(teacher / 2, -1).sort(-1, descending=True).values
    q = torch.softmax(student / 2, -1).sort(-1, descending=True).values
    q = torch.cat([q, torch.zeros(4, 4, dtype=torch.float64)], -1)  # the shorter vocabulary padded with zeros
    want = (p - q).abs().sum(-1).mean()
    assert uld_loss(student, teacher, temperature=2.0).item() == pytest.approx(want.item(), rel=1e-12)
    top3 = (p[:, :3] - q[:, :3]).abs().sum(-1).mean()
    assert uld_loss(student, teacher, temperature=2.0, top_k=3).item() == pytest.approx(top3.item(), rel=1e-12)
    mask = torch.tensor([True, False, True, False])
    masked = (p - q).abs().sum(-1)[mask].mean()
    assert uld_loss(student, teacher, temperature=2.0, mask=mask).item() == pytest.approx(masked.item(), rel=1e-12)
    assert 0.0 <= uld_loss(student, teacher).item() <= 2.0


def test_uld_gradient_reaches_the_student_only_and_empty_is_zero():
    student = torch.randn(3, 8, requires_grad=True)
    teacher = torch.randn(3, 12, requires_grad=True)
    uld_loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None
    empty = uld_loss(torch.zeros(0, 8, requires_grad=True), torch.zeros(0, 12))
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="align the response positions"):
        uld_loss(torch.zeros(3, 8), torch.zeros(2, 12))


def test_response_positions_are_aligned_in_order_and_cut_to_the_shorter():
    i = IGNORE_INDEX
    s = torch.tensor([[i, i, 5, 6, 7, i], [i, 1, 2, i, i, i]])
    t = torch.tensor([[i, 9, 9, i], [i, i, 3, 4]])
    s_rows, t_rows = aligned_response_rows(s, t)
    assert s_rows.tolist() == [2, 3, 7, 8]  # row 0: 2 of 3 (teacher has 2); row 1: both have 2
    assert t_rows.tolist() == [1, 2, 6, 7]


# ----------------------------------------------------------------------------------------------
# distilling across tokenizers


@pytest.fixture(scope="module")
def records():
    from mydistill.demo.task import make_examples

    return [{"prompt": e["prompt"], "response": e["answer"]} for e in make_examples(48, seed=9)]


def train_across(student, teacher, student_tokenizer, teacher_tokenizer, records, cfg, steps=20):
    objective = DistillObjective(LossConfig(alpha=0.0), student_hidden_size=32, student_num_layers=1)
    s_examples = [tokenize_example(student_tokenizer, r["prompt"], r["response"], 48) for r in records]
    t_examples = teacher_examples(records, teacher_tokenizer, 48)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0))
    history = []
    for step in range(steps):
        rows = order.roll(-16 * step)[:16].tolist()
        batch = collate([s_examples[i] for i in rows], student_tokenizer.pad_token_id)
        teacher_batch = collate_teacher([t_examples[i] for i in rows], teacher_tokenizer)
        out = uld_batch_loss(student, teacher, objective, batch, teacher_batch, cfg)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(out.metrics)
    return history


def test_uld_distils_across_two_different_tokenizers(demo_tokenizer, records):
    student_tokenizer = merged_tokenizer()
    assert not compare_tokenizers(demo_tokenizer, student_tokenizer).agree
    arch = {**TINY_ARCH, "tie_word_embeddings": False}
    teacher = build_model(arch, demo_tokenizer, seed=3).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40.0)  # a confident teacher: peaked next-token distributions
    assert build_model(TINY_ARCH, student_tokenizer).config.vocab_size != teacher.config.vocab_size

    ce_only = train_across(
        build_model(TINY_ARCH, student_tokenizer, seed=4), teacher, student_tokenizer, demo_tokenizer, records,
        CrossTokenizerConfig(method="uld", uld_weight=0.0),
    )
    with_uld = train_across(
        build_model(TINY_ARCH, student_tokenizer, seed=4), teacher, student_tokenizer, demo_tokenizer, records,
        CrossTokenizerConfig(method="uld", uld_weight=1.0),
    )
    assert with_uld[0]["uld_positions"] > 0
    assert with_uld[0]["uld"] == pytest.approx(ce_only[0]["uld"])  # same init, same first batch
    # the ULD term moves the student's distributions toward the teacher's, across vocabularies
    assert with_uld[-1]["uld"] < 0.6 * with_uld[0]["uld"]
    assert with_uld[-1]["uld"] < 0.75 * ce_only[-1]["uld"], (with_uld[-1]["uld"], ce_only[-1]["uld"])
    assert with_uld[-1]["ce"] < with_uld[0]["ce"]
    assert with_uld[-1]["loss"] == pytest.approx(with_uld[-1]["ce"] + with_uld[-1]["uld"], rel=1e-5)


def test_student_labels_cover_the_same_text_in_both_tokenizations(demo_tokenizer, records):
    """The aligned positions are response tokens on both sides (the prompts are never compared)."""
    student_tokenizer = merged_tokenizer()
    s = collate([tokenize_example(student_tokenizer, r["prompt"], r["response"], 48) for r in records[:8]], 0)
    t = collate(teacher_examples(records[:8], demo_tokenizer, 48), 0)
    s_rows, t_rows = aligned_response_rows(shift_labels(s["labels"]), shift_labels(t["labels"]))
    assert len(s_rows) == len(t_rows) > 0
    assert (shift_labels(s["labels"]).reshape(-1)[s_rows] != IGNORE_INDEX).all()
    assert (shift_labels(t["labels"]).reshape(-1)[t_rows] != IGNORE_INDEX).all()
