"""Teacher generation throughput: the batched hf backend vs one ``model.generate`` call per prompt.

    python benchmarks/generation.py                      # demo-sized random Llama built here, CPU
    python benchmarks/generation.py --teacher DIR        # any local / s3 teacher folder
    python benchmarks/generation.py --device cuda        # GPU
    python benchmarks/generation.py --device cuda --backend vllm

Both paths get the same teacher, the same prompts (chat-formatted the same way) and greedy
decoding, and both generate exactly --max-new-tokens tokens per prompt: end-of-sequence is
suppressed (``min_new_tokens`` in the loop, ``ignore_eos`` in the backend), so random weights are
fine and tokens/s compare like for like. The backend's time includes tokenizing and sorting.
The last line printed is ``speedup=<batched tokens/s divided by loop tokens/s>``.
"""

from __future__ import annotations

import argparse
import os
import random
import string
import sys
import time
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def pseudo_words() -> list[str]:
    consonants = "bdfgklmnprst"
    return [a + v + b for a in consonants for v in "aeiou" for b in consonants]  # 720 words


def build_demo_teacher(folder: str, seed: int = 0) -> str:
    """A 3.1M-parameter Llama (vocab 758, hidden 256, 4 layers, tied embeddings) with random weights."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
    vocab = {tok: i for i, tok in enumerate(specials + pseudo_words() + list(string.punctuation))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_prompts(n: int, min_words: int, max_words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = pseudo_words()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def per_prompt_loop(
    model: Any, tokenizer: Any, texts: list[str], max_new_tokens: int, chat: bool
) -> tuple[list[list[int]], float]:
    """The common recipe: tokenize one prompt, generate, decode; repeat."""
    import torch

    outputs = []
    start = time.perf_counter()
    with torch.inference_mode():
        for text in texts:
            inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(model.device)
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
            new = out[0, inputs["input_ids"].shape[1] :].tolist()
            tokenizer.decode(new, skip_special_tokens=True)
            outputs.append(new)
    return outputs, time.perf_counter() - start


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=None, help="teacher folder (default: build a demo-sized random Llama)")
    parser.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--prompts", type=int, default=128, help="number of prompts (both paths run all of them)")
    parser.add_argument("--min-words", type=int, default=8)
    parser.add_argument("--max-words", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from mydistill.generation import GenerationRequest, HFBackend, Sampling
    from mydistill.generation.hf import load_teacher, load_tokenizer

    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        teacher = args.teacher
        if teacher is None:
            import tempfile

            teacher = build_demo_teacher(
                os.path.join(tempfile.mkdtemp(prefix="mydistill-bench-"), "teacher"), args.seed
            )
            described = "demo-sized random Llama built from a config"
        else:
            described = teacher
        model = load_teacher(teacher, device=args.device, dtype=args.dtype)
        tokenizer = load_tokenizer(teacher)
        n_params = sum(p.numel() for p in model.parameters())

        backend: Any
        if args.backend == "vllm":
            from mydistill.generation.vllm import VLLMBackend

            backend = VLLMBackend(teacher, dtype=args.dtype, seed=args.seed)
        else:
            backend = HFBackend(model=model, tokenizer=tokenizer, batch_size=args.batch_size)

        prompts = make_prompts(args.prompts, args.min_words, args.max_words, args.seed)
        prepared = [backend.prepare(f"p{i}", p) for i, p in enumerate(prompts)]
        lengths = [len(p.token_ids) for p in prepared]
        texts = [p.text for p in prepared]
        chat = backend.formatter.has_template
        sampling = Sampling(max_new_tokens=args.max_new_tokens, ignore_eos=True)

        print(
            f"teacher: {described} ({n_params / 1e6:.2f}M params, vocab {len(tokenizer)}), device {args.device}, "
            f"torch threads {torch.get_num_threads()}, machine cores {os.cpu_count()}"
        )
        print(
            f"prompts: {len(prompts)}, prompt tokens {min(lengths)}..{max(lengths)} "
            f"(mean {sum(lengths) / len(lengths):.0f}); "
            f"{args.max_new_tokens} new tokens each on both paths (eos suppressed: min_new_tokens / ignore_eos), greedy"
        )

        # Warm-up, not timed. On a GPU both paths first run the whole workload once: cuDNN
        # attention builds a plan per new shape (every decoding step is one), which would
        # otherwise be timed on the batched path only; later shards reuse the plans.
        warm = len(texts) if args.device.startswith("cuda") else 2
        per_prompt_loop(model, tokenizer, texts[:warm], args.max_new_tokens if warm > 2 else 4, chat)
        backend.generate(
            [GenerationRequest(p) for p in prepared[:warm]],
            Sampling(max_new_tokens=args.max_new_tokens if warm > 2 else 4, ignore_eos=True),
        )

        loop_outputs, loop_s = per_prompt_loop(model, tokenizer, texts, args.max_new_tokens, chat)
        loop_tokens = sum(len(o) for o in loop_outputs)
        print(
            f"per-prompt loop (one model.generate per prompt): {loop_tokens} tokens in {loop_s:.2f} s "
            f"= {loop_tokens / loop_s:.1f} tokens/s"
        )

        start = time.perf_counter()
        requests = [GenerationRequest(backend.prepare(f"p{i}", p)) for i, p in enumerate(prompts)]
        results = backend.generate(requests, sampling)
        batched_s = time.perf_counter() - start
        batched_tokens = sum(r[0].completion_tokens for r in results)
        label = (
            "vllm" if args.backend == "vllm" else f"hf backend (batch {args.batch_size}, length-sorted, left-padded)"
        )
        print(f"{label}: {batched_tokens} tokens in {batched_s:.2f} s = {batched_tokens / batched_s:.1f} tokens/s")
        if batched_tokens != loop_tokens:
            print(f"WARNING: the paths generated different token counts ({batched_tokens} vs {loop_tokens})")
        same = sum(
            r[0].text == tokenizer.decode(o, skip_special_tokens=True)
            for r, o in zip(results, loop_outputs, strict=True)
        )
        print(f"identical greedy outputs: {same}/{len(prompts)}")
        speedup = (batched_tokens / batched_s) / (loop_tokens / loop_s)
        print(f"speedup={speedup:.1f}")
        sys.stdout.flush()
        return speedup
    finally:
        torch.set_num_threads(threads_before)


if __name__ == "__main__":
    main()
