"""The teacher-signal store: writer, reader, the signal stage, and the teacher side of a training batch."""

import os

import numpy as np
import pytest
import torch

from mydistill import io
from mydistill.losses import DistillObjective, LossConfig, TopKTeacher
from mydistill.models import build_model, load_model, load_tokenizer
from mydistill.signal import (
    SignalConfig,
    SignalStore,
    SignalStoreWriter,
    StoreFormatError,
    StoreMismatch,
    StoreTeacher,
    compute_teacher_signal,
    example_key,
)
from mydistill.signal.store import write_store_manifest
from mydistill.tokenization import IGNORE_INDEX, collate, shift_labels, tokenize_example

from tests.conftest import TINY_ARCH


def fake_entry(rng, t, k, vocab):
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(t)])
    lp = np.log(rng.dirichlet(np.ones(k), size=t) * 0.9)
    return ids, lp, np.full(t, 0.1)


def write_fake_store(uri, entries, *, slots, shard_bytes=1 << 20, **content):
    writer = SignalStoreWriter(uri, slots=slots, shard_bytes=shard_bytes)
    for key, entry in entries.items():
        writer.add(key, *entry)
    written = writer.close()
    meta = dict(
        slots=slots, k=slots, mode="topk", vocab_size=500, temperature=1.0, tokenizer_sha256="tok",
        data_sha256="data", max_length=48, teacher={"id": "t"},
    )
    meta.update(content)
    return write_store_manifest(uri, inputs={"x": 1}, written=written, **meta)


def test_round_trip_over_several_shards_with_duplicates_stored_once(tmp_path):
    rng = np.random.default_rng(0)
    entries = {example_key(f"p{i}", "r"): fake_entry(rng, int(rng.integers(1, 20)), 8, 500) for i in range(60)}
    uri = str(tmp_path / "store")
    writer = SignalStoreWriter(uri, slots=8, shard_bytes=600)
    for key, entry in entries.items():
        writer.add(key, *entry)
        writer.add(key, *entry)  # an upsampled copy: skipped
    written = writer.close()
    write_store_manifest(
        uri, inputs={}, written=written, slots=8, k=8, mode="topk", vocab_size=500, temperature=1.0,
        tokenizer_sha256="tok", data_sha256="data", max_length=48,
    )
    assert len(written["shards"]) > 3
    assert written["counts"]["examples"] == 60
    assert not [f for f in os.listdir(uri) if ".tmp-" in f]  # atomic commits left nothing behind

    store = SignalStore(uri)
    assert len(store) == 60 and store.tokens == sum(len(e[0]) for e in entries.values())
    for key, (ids, lp, res) in entries.items():
        got = store.get(key)
        order = np.argsort(ids, axis=1)
        assert np.array_equal(got.token_ids, np.take_along_axis(ids, order, axis=1))
        assert np.allclose(np.exp(got.log_probs), np.exp(np.take_along_axis(lp, order, axis=1)), atol=0.012)
        assert np.allclose(got.residual, res, rtol=1e-3)
    assert example_key("missing", "r") not in store
    with pytest.raises(KeyError):
        store.get(example_key("missing", "r"))
    store.verify()


def test_reader_refuses_unfinished_damaged_or_foreign_stores(tmp_path):
    uri = str(tmp_path / "store")
    rng = np.random.default_rng(1)
    writer = SignalStoreWriter(uri, slots=4)
    writer.add(example_key("a", "b"), *fake_entry(rng, 3, 4, 500))
    writer.close()
    with pytest.raises(io.DataError, match="no finished teacher-signal store"):
        SignalStore(uri)  # shards written, manifest not: a crashed writer
    manifest = write_fake_store(uri, {example_key("a", "b"): fake_entry(rng, 3, 4, 500)}, slots=4)
    io.write_json(io.join(uri, "manifest.json"), {**manifest, "format": {"name": "mydistill-teacher-signal", "version": 99}})
    with pytest.raises(StoreFormatError, match="recompute it"):
        SignalStore(uri)
    write_fake_store(uri, {example_key("a", "b"): fake_entry(rng, 3, 4, 500)}, slots=4)
    with open(os.path.join(uri, "shard-00000.bin"), "r+b") as f:
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(StoreFormatError, match="sha256 differs"):
        SignalStore(uri).verify()


def test_mismatching_store_is_refused_with_reasons(tmp_path):
    uri = str(tmp_path / "store")
    write_fake_store(uri, {example_key("a", "b"): fake_entry(np.random.default_rng(2), 3, 4, 500)}, slots=4)
    store = SignalStore(uri)
    store.check_matches(tokenizer_sha256="tok", data_sha256="data", vocab_size=500)
    with pytest.raises(StoreMismatch) as err:
        store.check_matches(tokenizer_sha256="other", data_sha256="changed", vocab_size=600)
    message = str(err.value)
    assert "another tokenizer" in message and "other training data" in message and "500 tokens" in message
    assert "Recompute the store" in message


@pytest.mark.slow
def test_store_on_s3_is_read_by_range(s3_endpoint):
    uri = "s3://mydistill-test/signal-store"
    rng = np.random.default_rng(3)
    entries = {example_key(f"p{i}", "r"): fake_entry(rng, 5, 8, 500) for i in range(20)}
    write_fake_store(uri, entries, slots=8, shard_bytes=500)
    store = SignalStore(uri)
    for key, (ids, _, _) in entries.items():
        assert np.array_equal(store.get(key).token_ids, np.sort(ids, axis=1))


# ----------------------------------------------------------------------------------------------
# the signal stage on a tiny model


@pytest.fixture
def mix_records():
    from mydistill.demo.task import make_examples

    rows = [{"id": e["id"], "prompt": e["prompt"], "response": e["answer"], "source": "teacher"} for e in make_examples(24, seed=3)]
    return rows + rows[:8]  # upsampled copies, as the mix makes them


@pytest.fixture
def data_uri(tmp_path, mix_records):
    uri = str(tmp_path / "train.jsonl")
    io.write_records(uri, mix_records)
    return uri


def teacher_logits_at_responses(model, tokenizer, records, max_length=48):
    examples = [tokenize_example(tokenizer, r["prompt"], r["response"], max_length) for r in records]
    batch = collate(examples, tokenizer.pad_token_id)
    labels = shift_labels(batch["labels"])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return batch, labels, logits


def test_signal_stage_stores_the_teachers_top_k_once_per_distinct_example(tmp_path, data_uri, mix_records, tiny_model_dir):
    out = str(tmp_path / "signal")
    cfg = SignalConfig(k=16, mode="topk", batch_size=5, device="cpu")
    manifest = compute_teacher_signal(data_uri, tiny_model_dir, out, cfg=cfg, max_length=48)
    assert manifest["counts"]["examples"] == 24 and manifest["records"] == 32
    assert manifest["k"] == 16 and manifest["slots"] == 16 and manifest["vocab_size"] == 261
    assert set(manifest["teacher"]) == {"id", "uri", "weights_sha256"}
    assert manifest["data_sha256"] == io.records_sha256(mix_records)
    assert compute_teacher_signal(data_uri, tiny_model_dir, out, cfg=cfg, max_length=48) == manifest  # reused

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    batch, labels, logits = teacher_logits_at_responses(model, tokenizer, mix_records[:6])
    store = SignalStore(out)
    for row, record in enumerate(mix_records[:6]):
        entry = store.get(example_key(record["prompt"], record["response"]))
        want = TopKTeacher.from_logits(logits[row][labels[row] != IGNORE_INDEX], 16)
        assert entry.tokens == int((labels[row] != IGNORE_INDEX).sum())
        assert np.array_equal(entry.token_ids, np.sort(want.token_ids.numpy(), axis=1))
        assert np.allclose(entry.residual, want.residual.numpy(), rtol=2e-3, atol=1e-6)


def test_loss_from_the_store_matches_the_online_teacher(tmp_path, data_uri, mix_records, tiny_model_dir, demo_tokenizer):
    """k = V: lossless up to the 8-bit log-probs; k < V: the same as the online top-k teacher."""
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    student = build_model(TINY_ARCH, tokenizer, seed=7)
    rows = list(range(8))
    batch, labels, logits = teacher_logits_at_responses(model, tokenizer, [mix_records[i] for i in rows])
    with torch.no_grad():
        hidden = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    objective = DistillObjective(LossConfig(alpha=1.0, temperature=2.0), student_hidden_size=32, student_num_layers=1)

    def kd(**teacher):
        return objective(student_hidden=hidden, student_head_weight=student.lm_head.weight, labels=labels, **teacher).loss

    for k in (261, 32):
        out = str(tmp_path / f"signal-{k}")
        compute_teacher_signal(data_uri, tiny_model_dir, out, cfg=SignalConfig(k=k, mode="topk", device="cpu"), max_length=48)
        source = StoreTeacher([out], records=mix_records, tokenizer=tokenizer, vocab_size=261, temperature=2.0)
        from_store = kd(teacher=source.batch_topk(rows, labels))
        online = kd(teacher=logits) if k == 261 else kd(teacher=TopKTeacher.from_logits(logits, k))
        # the only difference left is the 8-bit log-probs (a near-uniform random teacher: KL is tiny)
        assert from_store.item() == pytest.approx(online.item(), rel=0.05, abs=1e-3)


def test_store_for_other_data_or_tokenizer_is_refused(tmp_path, data_uri, mix_records, tiny_model_dir):
    from tests.mydistill.test_models import other_tokenizer

    out = str(tmp_path / "signal")
    compute_teacher_signal(data_uri, tiny_model_dir, out, cfg=SignalConfig(k=8, sampled_tokens=4, device="cpu"), max_length=48)
    tokenizer = load_tokenizer(tiny_model_dir)
    with pytest.raises(StoreMismatch, match="other training data"):
        StoreTeacher([out], records=mix_records[:-1], tokenizer=tokenizer, vocab_size=261)
    with pytest.raises(StoreMismatch, match="another tokenizer"):
        StoreTeacher([out], records=mix_records, tokenizer=other_tokenizer(), vocab_size=261)
    short = str(tmp_path / "short")
    compute_teacher_signal(data_uri, tiny_model_dir, short, cfg=SignalConfig(k=8, sampled_tokens=4, device="cpu"), max_length=19)
    source = StoreTeacher([short], records=mix_records, tokenizer=tokenizer, vocab_size=261)
    examples = [tokenize_example(tokenizer, r["prompt"], r["response"], 48) for r in mix_records[:4]]
    with pytest.raises(StoreMismatch, match="computed with max_length=19"):
        source.batch_topk([0, 1, 2, 3], shift_labels(collate(examples, tokenizer.pad_token_id)["labels"]))


def test_sampled_store_refuses_divergences_it_is_not_unbiased_for(tmp_path, data_uri, mix_records, tiny_model_dir):
    out = str(tmp_path / "signal")
    cfg = SignalConfig(k=16, mode="sampled", sampled_tokens=8, device="cpu")
    manifest = compute_teacher_signal(data_uri, tiny_model_dir, out, cfg=cfg, max_length=48)
    assert manifest["slots"] == 16 and manifest["mode"] == "sampled"
    tokenizer = load_tokenizer(tiny_model_dir)
    StoreTeacher([out], records=mix_records, tokenizer=tokenizer, vocab_size=261, divergence="forward_kl")
    with pytest.raises(StoreMismatch, match="only for forward_kl"):
        StoreTeacher([out], records=mix_records, tokenizer=tokenizer, vocab_size=261, divergence="reverse_kl")


def test_two_stores_are_mixed_with_the_loss_weights(tmp_path, data_uri, mix_records, tiny_model_dir):
    other_dir = tmp_path / "teacher-b"
    tokenizer = load_tokenizer(tiny_model_dir)
    build_model(TINY_ARCH, tokenizer, seed=11).save_pretrained(other_dir)
    tokenizer.save_pretrained(other_dir)
    a, b = str(tmp_path / "sig-a"), str(tmp_path / "sig-b")
    compute_teacher_signal(data_uri, tiny_model_dir, a, cfg=SignalConfig(k=8, mode="topk", device="cpu"), max_length=48)
    compute_teacher_signal(data_uri, str(other_dir), b, cfg=SignalConfig(k=8, mode="topk", device="cpu"), max_length=48)
    examples = [tokenize_example(tokenizer, r["prompt"], r["response"], 48) for r in mix_records[:4]]
    labels = shift_labels(collate(examples, tokenizer.pad_token_id)["labels"])
    mixed = StoreTeacher([a, b], records=mix_records, tokenizer=tokenizer, vocab_size=261, weights=[3, 1], temperature=2.0)
    teacher = mixed.batch_topk([0, 1, 2, 3], labels)
    assert 8 <= teacher.k <= 16
    valid = labels != IGNORE_INDEX
    cat = teacher.flatten().rows(valid.reshape(-1)).category_log_probs(2.0, 261)
    assert torch.allclose(cat.exp().sum(-1), torch.ones(int(valid.sum())), atol=1e-5)
    with pytest.raises(ValueError, match="one weight per teacher-signal store"):
        StoreTeacher([a, b], records=mix_records, tokenizer=tokenizer, vocab_size=261, weights=[1.0])


def test_store_at_the_loss_temperature_matches_the_exact_tempered_teacher(tmp_path, data_uri, mix_records, tiny_model_dir):
    from mydistill.losses import DistillMix, distill_loss
    from mydistill.signal.teacher import pretempered

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    batch, labels, logits = teacher_logits_at_responses(model, tokenizer, mix_records[:6])
    out = str(tmp_path / "signal-t2")
    manifest = compute_teacher_signal(data_uri, tiny_model_dir, out, cfg=SignalConfig(k=16, mode="topk", temperature=2.0, device="cpu"), max_length=48)
    assert manifest["temperature"] == 2.0
    source = StoreTeacher([out], records=mix_records, tokenizer=tokenizer, vocab_size=261, temperature=2.0)
    student = torch.randn(*logits.shape, generator=torch.Generator().manual_seed(0))
    valid = (labels != IGNORE_INDEX).reshape(-1)
    flat = lambda t: t.flatten().rows(valid)  # noqa: E731
    got = distill_loss(student.reshape(-1, 261)[valid], flat(source.batch_topk(list(range(6)), labels)), mix=DistillMix(temperature=2.0, alpha=1.0))
    exact = TopKTeacher.from_logits(logits / 2.0, 16)
    want = distill_loss(student.reshape(-1, 261)[valid], flat(pretempered(exact, 2.0, 261)), mix=DistillMix(temperature=2.0, alpha=1.0))
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=0.02, abs=1e-4)
    with pytest.raises(StoreMismatch, match="temperature 2.0 but distill.loss.temperature is 3.0"):
        StoreTeacher([out], records=mix_records, tokenizer=tokenizer, vocab_size=261, temperature=3.0)
