"""Benchmark: the offline teacher-signal store vs the online teacher.

In one run, on a synthetic language task with a 2,048-token byte-level BPE vocabulary (so k = 64
is a real truncation), built and trained locally (no model hub):

1. a teacher (Llama-style, 4 layers, width 128, untied head) is trained with cross-entropy;
2. the signal stage writes its stores over the training mix, at the loss temperature as the
   pipeline does: the **default** store (``SignalConfig()``: ``k = 64`` entries per token,
   ``mode: auto``, which is ``sampled`` for this forward-KL loss, so 32 exact top tokens +
   ``sampled_tokens`` = 32 importance-sampled tail slots), a sampled store with more slots (64
   exact + 32 sampled, k = 96), top-k stores with k = 64 and k = 8, and one k = 64 top-k store at
   T = 1 (re-tempered by the loss); we report bytes per stored response token, counting
   everything on disk (shards, indexes, manifest), and the teacher mass the top-64 leaves out;
3. the same student (same init, same batches, same seed) is distilled for a fixed number of steps
   from the online teacher and from each store, with the default loss (forward KL, T = 2,
   alpha = 0.5);
4. every final student is scored with the *same* yardstick: the distill loss against the dense
   online teacher (alpha * T² * KL + (1 - alpha) * CE) on held-out examples.

The **served** stores come from the same teacher behind the project's OpenAI-compatible server
(``python -m mydistill.generation.serve``, a subprocess on 127.0.0.1) through the signal stage's
``backend: openai`` path (``/v1/completions`` with ``echo`` + ``logprobs: k``, every record's
tokens checked): ``served topk-64`` from a server that applies the request's temperature to its
log-probs (``--logprobs-mode processed``, as vLLM's ``processed_logprobs``), to compare with the
local ``topk-64``; ``served topk-64 raw`` from one that returns raw log-probs (vLLM's default),
which the stage records as T = 1, to compare with ``topk-64 at T=1``.

``loss_gap = |loss(store) - loss(online)| / loss(online)``. The last line is for the default
store at k = 64 (32 exact + 32 sampled entries); the line before it is for top-k at k = 64, and
the one before that for the served top-k at k = 64.

Usage: python benchmarks/teacher_cache.py [--steps 150] [--examples 3000] [--threads 2] [--stores all]
The last line is ``bytes_per_token=<x> loss_gap=<|store-online|/online>`` for the default store.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import torch

from mydistill import io
from mydistill.losses import DistillObjective, HiddenHead, LossConfig
from mydistill.models import build_model, count_parameters
from mydistill.signal import SignalConfig, StoreTeacher, compute_teacher_signal
from mydistill.tokenization import collate, shift_labels, tokenize_example

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TEACHER_ARCH = dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384,
    max_position_embeddings=96, tie_word_embeddings=False,
)
STUDENT_ARCH = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192,
    max_position_embeddings=96, tie_word_embeddings=True,
)
MAX_LENGTH = 64


# ----------------------------------------------------------------------------------------------
# a synthetic language: a Zipfian lexicon and a sparse bigram chain over it


def make_language(seed: int = 0, words: int = 3000):
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvz" for v in "aeiou"] + ["qu", "sh", "th", "ch"]
    lexicon = sorted({"".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3)))) for _ in range(words)})
    rng.shuffle(lexicon)
    zipf = [1.0 / (i + 1) for i in range(len(lexicon))]
    # each word is followed by one of a few successors: the teacher can learn a peaked distribution
    successors = {w: rng.choices(range(len(lexicon)), weights=zipf, k=6) for w in lexicon}
    weights = [0.45, 0.2, 0.15, 0.1, 0.06, 0.04]

    def sentence(length: int) -> list[str]:
        word = rng.choices(lexicon, weights=zipf)[0]
        out = [word]
        for _ in range(length - 1):
            word = lexicon[rng.choices(successors[word], weights=weights)[0]] if rng.random() < 0.9 else rng.choice(lexicon)
            out.append(word)
        return out

    return sentence


def make_records(n: int, seed: int) -> list[dict[str, str]]:
    sentence = make_language(seed=0)
    random.seed(seed)
    rows = []
    for i in range(n):
        words = sentence(14)
        rows.append({"id": f"s{seed}-{i}", "prompt": "continue: " + " ".join(words[:6]), "response": " ".join(words[6:]), "source": "teacher"})
    return rows


def build_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>", chat_template=CHAT_TEMPLATE, padding_side="right"
    )


# ----------------------------------------------------------------------------------------------
# training loops (the same data order for every run)


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    while len(out) < steps:
        order = torch.randperm(n, generator=g).tolist()
        out.extend(order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size))
    return out[:steps]


def train_teacher(tokenizer, examples, steps: int, seed: int):
    model = build_model(TEACHER_ARCH, tokenizer, seed=seed)
    objective = DistillObjective(LossConfig(alpha=0.0), student_hidden_size=128, student_num_layers=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for idx in batch_indices(len(examples), 64, steps, seed):
        batch = collate([examples[i] for i in idx], tokenizer.pad_token_id)
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        out = objective(student_hidden=hidden, student_head_weight=model.lm_head.weight, labels=shift_labels(batch["labels"]))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval().requires_grad_(False), out.metrics["ce"]


def distill(tokenizer, examples, teacher, store: StoreTeacher | None, loss_cfg: LossConfig, steps: int, seed: int):
    """Distil a fresh student (same init every call) from the online teacher or from a store."""
    student = build_model(STUDENT_ARCH, tokenizer, seed=seed)
    objective = DistillObjective(loss_cfg, student_hidden_size=64, student_num_layers=2)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    for idx in batch_indices(len(examples), 32, steps, seed + 1):
        batch = collate([examples[i] for i in idx], tokenizer.pad_token_id)
        labels = shift_labels(batch["labels"])
        hidden = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        if store is None:
            with torch.no_grad():
                t_hidden = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            signal = {"teacher_hidden": t_hidden, "teacher_head_weight": teacher.lm_head.weight}
        else:
            signal = {"teacher_topk": store.batch_topk(idx, labels)}
        out = objective(student_hidden=hidden, student_head_weight=student.lm_head.weight, labels=labels, **signal)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return student.eval(), time.perf_counter() - start


@torch.no_grad()
def dense_distill_loss(student, teacher, tokenizer, examples, loss_cfg: LossConfig) -> dict[str, float]:
    """The yardstick: the distill loss against the dense online teacher, token-weighted over ``examples``."""
    objective = DistillObjective(loss_cfg, student_hidden_size=64, student_num_layers=2)
    totals = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "teacher_agreement": 0.0}
    tokens = 0.0
    for start in range(0, len(examples), 128):
        batch = collate(examples[start : start + 128], tokenizer.pad_token_id)
        labels = shift_labels(batch["labels"])
        hidden = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        t_hidden = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        out = objective(
            student_hidden=hidden, student_head_weight=student.lm_head.weight, labels=labels,
            teacher=HiddenHead(t_hidden, teacher.lm_head.weight),
        )
        n = out.metrics["tokens"]
        for key in totals:
            totals[key] += out.metrics[key] * n
        tokens += n
    return {k: v / tokens for k, v in totals.items()}


class TeacherServer:
    """``python -m mydistill.generation.serve`` on a free port of 127.0.0.1 (stopped by close())."""

    def __init__(self, model_dir: str, *args: str) -> None:
        import subprocess
        import sys

        cmd = [sys.executable, "-m", "mydistill.generation.serve", "--model", model_dir, "--port", "0", "--dtype", "float32", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("serving "):
                self.api_base = line.split(" at ")[1].strip()
                return
        raise RuntimeError("the teacher server exited before serving")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def served_store(teacher_dir: str, tokenizer, data_uri: str, uri: str, *, k: int, temperature: float, processed: bool) -> dict:
    from mydistill.signal.served import compute_served_signal

    server = TeacherServer(teacher_dir, "--max-logprobs", str(k), *(("--logprobs-mode", "processed") if processed else ()))
    try:
        cfg = SignalConfig(backend="openai", api_base=server.api_base, k=k, mode="topk", api_batch_size=16, concurrency=2)
        return compute_served_signal(data_uri, teacher_dir, uri, cfg=cfg, max_length=MAX_LENGTH, temperature=temperature, tokenizer=tokenizer)
    finally:
        server.close()


def store_size(uri: str) -> int:
    return sum(os.path.getsize(os.path.join(uri, f)) for f in os.listdir(uri))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=3000, help="distinct training examples")
    parser.add_argument("--upsample", type=float, default=1.3, help="mix size / distinct examples (copies share one entry)")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150, help="distillation steps per run")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stores", default="all",
        help="comma-separated subset of: default, sampled, topk, topk-T1, topk-8, served, served-raw (topk and default always run)",
    )
    args = parser.parse_args()
    chosen = {"default", "sampled", "topk", "topk-T1", "topk-8", "served", "served-raw"} if args.stores == "all" else {
        *args.stores.split(","), "default", "topk"
    }
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()

    distinct = make_records(args.examples, seed=1)
    rng = random.Random(args.seed)
    mix = distinct + [rng.choice(distinct) for _ in range(int(len(distinct) * (args.upsample - 1)))]
    rng.shuffle(mix)
    held_out = make_records(300, seed=2)
    tokenizer = build_tokenizer([r["prompt"] + " " + r["response"] for r in distinct], args.vocab)
    vocab = len(tokenizer)
    train_examples = [tokenize_example(tokenizer, r["prompt"], r["response"], MAX_LENGTH) for r in mix]
    eval_examples = [tokenize_example(tokenizer, r["prompt"], r["response"], MAX_LENGTH) for r in held_out]
    loss_cfg = LossConfig()  # the defaults: forward_kl, T = 2, alpha = 0.5

    with tempfile.TemporaryDirectory(prefix="teacher-cache-bench-") as tmp:
        data_uri = os.path.join(tmp, "train.jsonl")
        io.write_records(data_uri, mix)
        teacher, teacher_ce = train_teacher(tokenizer, [tokenize_example(tokenizer, r["prompt"], r["response"], MAX_LENGTH) for r in distinct], args.teacher_steps, args.seed)
        teacher_dir = os.path.join(tmp, "teacher")
        teacher.save_pretrained(teacher_dir)
        tokenizer.save_pretrained(teacher_dir)
        print(
            f"vocab {vocab}, teacher {count_parameters(teacher):,} parameters (train CE {teacher_ce:.3f}), "
            f"student {count_parameters(build_model(STUDENT_ARCH, tokenizer)):,}; mix {len(mix)} records "
            f"({len(distinct)} distinct), {args.steps} distillation steps per run, loss: forward_kl T=2 alpha=0.5"
        )

        stores: dict[str, dict] = {}
        t_loss = loss_cfg.temperature  # stores at the loss temperature (the pipeline's default), one at 1 to compare
        default_cfg = SignalConfig(k=args.k, temperature=t_loss, device="cpu", batch_size=64)  # mode: auto
        mode = default_cfg.resolved_mode(loss_cfg.divergence)
        exact = default_cfg.exact_tokens(mode)
        default = f"default: {mode}-{exact}+{args.k - exact}" if mode == "sampled" else f"default: topk-{args.k}"
        wide = args.k + default_cfg.sampled_tokens
        for key, name, cfg in (
            ("default", default, default_cfg),
            ("sampled", f"sampled-{args.k}+{wide - args.k}", SignalConfig(k=wide, mode="sampled", temperature=t_loss, device="cpu", batch_size=64)),
            ("topk", f"topk-{args.k}", SignalConfig(k=args.k, mode="topk", temperature=t_loss, device="cpu", batch_size=64)),
            ("topk-T1", f"topk-{args.k} at T=1", SignalConfig(k=args.k, mode="topk", temperature=1.0, device="cpu", batch_size=64)),
            ("topk-8", "topk-8", SignalConfig(k=8, mode="topk", temperature=t_loss, device="cpu", batch_size=64)),
            ("served", f"served topk-{args.k}", None),
            ("served-raw", f"served topk-{args.k} raw", None),
        ):
            if key not in chosen:
                continue
            uri = os.path.join(tmp, name.replace(" ", "-").replace("=", "").replace(":", "").replace("+", "p"))
            t0 = time.perf_counter()
            if cfg is None:  # the same teacher behind the project's server, through signal.backend: openai
                manifest = served_store(
                    teacher_dir, tokenizer, data_uri, uri, k=args.k, temperature=t_loss, processed=key == "served"
                )
            else:
                manifest = compute_teacher_signal(
                    data_uri, teacher_dir, uri, cfg=cfg, max_length=MAX_LENGTH, teacher=teacher, tokenizer=tokenizer,
                    divergence=loss_cfg.divergence,
                )
            tokens = manifest["counts"]["tokens"]
            stores[name] = {
                "uri": uri,
                "blocks": manifest["counts"]["bytes"] / tokens,
                "total": store_size(uri) / tokens,
                "tokens": tokens,
                "examples": manifest["counts"]["examples"],
                "seconds": time.perf_counter() - t0,
            }

        # how much teacher mass the top-k leaves out (is k a real truncation?)
        from mydistill.signal import SignalStore

        store = SignalStore(stores[f"topk-{args.k}"]["uri"])
        residuals = torch.cat([torch.from_numpy(store.get(key).residual) for key in list(store.keys())[:500]])
        print(
            f"top-{args.k} of {vocab} at T={t_loss}: residual mass mean {residuals.mean():.4f}, median "
            f"{residuals.median():.2e}, max {residuals.max():.3f} (the tail the top-k cannot show)"
        )
        if f"topk-{args.k} at T=1" in stores:
            at_one = SignalStore(stores[f"topk-{args.k} at T=1"]["uri"])
            residuals = torch.cat([torch.from_numpy(at_one.get(key).residual) for key in list(at_one.keys())[:500]])
            print(f"top-{args.k} of {vocab} at T=1: residual mass mean {residuals.mean():.4f}, median {residuals.median():.2e}")
        for name in (f"served topk-{args.k}", f"served topk-{args.k} raw"):
            if name in stores:
                m = SignalStore(stores[name]["uri"]).manifest
                print(f"{name}: stored at T={m['temperature']} (asked {m['requested_temperature']}), {stores[name]['seconds']:.0f}s to score")
        print()
        print("| store | mode | slots/token | bytes/token (blocks) | bytes/token (all files) | unique examples | tokens |")
        print("|---|---|---|---|---|---|---|")
        for name, s in stores.items():
            opened = SignalStore(s["uri"])
            print(f"| {name} | {opened.mode} | {opened.slots} | {s['blocks']:.1f} | {s['total']:.1f} | {s['examples']} | {s['tokens']} |")
        print(f"(for scale: uint32 ids + fp16 log-probs at k={args.k} would be {args.k * 6} bytes/token, uint16 + fp16 {args.k * 4})")
        print()

        results = {}
        student, seconds = distill(tokenizer, train_examples, teacher, None, loss_cfg, args.steps, args.seed)
        results["online"] = {**dense_distill_loss(student, teacher, tokenizer, eval_examples, loss_cfg), "seconds": seconds}
        for name, s in stores.items():
            source = StoreTeacher(
                [s["uri"]], records=mix, tokenizer=tokenizer, vocab_size=vocab, temperature=loss_cfg.temperature,
                divergence=loss_cfg.divergence,
            )
            student, seconds = distill(tokenizer, train_examples, teacher, source, loss_cfg, args.steps, args.seed)
            results[name] = {**dense_distill_loss(student, teacher, tokenizer, eval_examples, loss_cfg), "seconds": seconds}
        base = results["online"]["loss"]
        # (per-run times are not shown: on a shared CPU they measure the neighbours, not the store)
        print("| teacher signal | distill loss vs dense teacher (held out) | gap to online | KD | CE | top-1 agreement |")
        print("|---|---|---|---|---|---|")
        for name, r in results.items():
            gap = abs(r["loss"] - base) / base
            print(f"| {name} | {r['loss']:.4f} | {gap:.2%} | {r['kd']:.4f} | {r['ce']:.4f} | {r['teacher_agreement']:.1%} |")
        print(f"\ntotal {time.perf_counter() - begin:.0f}s", flush=True)
        for name in (f"served topk-{args.k} raw", f"served topk-{args.k}"):
            if name in results:
                gap = abs(results[name]["loss"] - base) / base
                print(f"{name.replace(' ', '-')}: bytes_per_token={stores[name]['total']:.1f} loss_gap={gap:.4f}")
        gap = abs(results[f"topk-{args.k}"]["loss"] - base) / base
        print(f"topk-{args.k}: bytes_per_token={stores[f'topk-{args.k}']['total']:.1f} loss_gap={gap:.4f}")
        gap = abs(results[default]["loss"] - base) / base
        print(f"bytes_per_token={stores[default]['total']:.1f} loss_gap={gap:.4f}")


if __name__ == "__main__":
    main()
