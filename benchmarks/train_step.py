"""Our distill step vs the common recipe, side by side in one run.

The recipe is what most distillation tutorials do: a ``transformers.Trainer`` subclass whose
``compute_loss`` runs the student and the frozen teacher to full (B, T, V) logits and computes
``alpha * KL(T) * T² + (1 - alpha) * CE``. Ours is the distill stage's own step
(:class:`mydistill.training.objective.StudentObjective` under the plain engine): both models stop at their
final hidden states and the fused chunked loss projects to the vocabulary a chunk of tokens at a
time, computing the gradient in the forward pass.

Both train the same student (same initial weights) from the same teacher on the same batches
with the same optimizer settings. Reported:

- tokens/s over ``--steps`` steps after warm-up (the recipe timed through ``Trainer.train``, so
  its own overhead counts, as it does for its users);
- extra peak memory of one training step (forward, backward, optimizer step) above what was
  allocated before it, at the allocator: ``torch.cuda.max_memory_allocated`` on CUDA, the torch
  profiler's CPU allocation events (running sum, peak) on CPU.

The last line is ``tokens_per_s_ratio=<ours/recipe> peak_memory_ratio=<ours/recipe>``.

    python benchmarks/train_step.py                 # CPU, V = 32,000
    python benchmarks/train_step.py --device cuda --vocab 128256 --student-hidden 768 --student-layers 12
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mydistill.config import DistillConfig  # noqa: E402
from mydistill.losses import DistillObjective, LossConfig  # noqa: E402
from mydistill.tokenization import IGNORE_INDEX, TokenizedExample, collate  # noqa: E402
from mydistill.training.engines import PlainEngine  # noqa: E402
from mydistill.training.objective import StudentObjective  # noqa: E402
from mydistill.training.teachers import OnlineTeachers  # noqa: E402


def llama(vocab: int, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        intermediate_size=hidden * 4, max_position_embeddings=1024, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def make_batches(n: int, batch: int, prompt: int, response: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        examples = []
        for _ in range(batch):
            ids = torch.randint(3, vocab, (prompt + response,), generator=g).tolist()
            examples.append(TokenizedExample(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:]))
        out.append(collate(examples, pad_token_id=0))
    return out


def recipe_loss(student, teacher, batch, temperature: float, alpha: float) -> torch.Tensor:
    """The common recipe's loss on full logits (the one in most KD tutorials)."""
    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s_logits = out.logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    s, t = s_logits[mask], t_logits[:, :-1][mask]
    kd = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="batchmean") * temperature**2
    ce = F.cross_entropy(s, labels[mask])
    return alpha * kd + (1 - alpha) * ce


def make_recipe_trainer(student, teacher, batches, args, device):
    from transformers import Trainer, TrainingArguments

    class KDTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return recipe_loss(model, teacher, inputs, args.temperature, args.alpha)

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            return batches[i]

    out_dir = tempfile.mkdtemp(prefix="kd-recipe-")
    training_args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=1, max_steps=args.steps, learning_rate=args.lr,
        weight_decay=0.01, warmup_steps=0, lr_scheduler_type="constant", logging_steps=10**9, save_strategy="no",
        report_to=[], use_cpu=device.type == "cpu", dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True, max_grad_norm=1.0,
        bf16=args.bf16,
    )
    return KDTrainer(
        model=student, args=training_args, train_dataset=Batches(),
        data_collator=lambda items: items[0],  # each item is already a whole batch
    )


def extra_peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = peak = 0
    for e in sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
        key=lambda e: e.start_ns(),
    ):
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--student-hidden", type=int, default=256)
    p.add_argument("--student-layers", type=int, default=4)
    p.add_argument("--teacher-hidden", type=int, default=512)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--response", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--bf16", action="store_true", help="bf16 models on CUDA")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    teacher = llama(args.vocab, args.teacher_hidden, args.teacher_layers, seed=1).to(device, dtype).eval().requires_grad_(False)
    init = llama(args.vocab, args.student_hidden, args.student_layers, seed=2).state_dict()
    cpu_batches = make_batches(args.warmup + args.steps + 1, args.batch, args.prompt, args.response, args.vocab, seed=3)
    batches = [{k: v.to(device) for k, v in b.items()} for b in cpu_batches]  # the Trainer moves its own
    tokens_per_step = int(batches[0]["attention_mask"].sum())
    n_params = sum(v.numel() for v in init.values())

    def fresh_student():
        s = llama(args.vocab, args.student_hidden, args.student_layers, seed=2)
        s.load_state_dict(init)
        return s.to(device, dtype).train()

    # ---- ours: the distill stage's step
    cfg = DistillConfig(steps=args.steps, lr=args.lr, warmup_steps=0, min_lr_ratio=1.0, batch_size=args.batch,
                        loss=LossConfig(temperature=args.temperature, alpha=args.alpha, chunk_size=args.chunk_size))
    student = fresh_student()
    objective = DistillObjective(cfg.loss, student_hidden_size=args.student_hidden, student_num_layers=args.student_layers).to(device)
    engine = PlainEngine(StudentObjective(student, objective), cfg)

    def our_step(batch):
        loss, _ = engine(batch, OnlineTeachers([teacher]).signal(batch))
        engine.backward(loss)
        engine.step()

    for b in batches[: args.warmup]:
        our_step(b)
    ours_mem = extra_peak_bytes(lambda: our_step(batches[args.warmup]), device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for b in batches[args.warmup + 1 :]:
        our_step(b)
    sync()
    ours_time = time.perf_counter() - start
    del engine, objective, student
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ---- the recipe: Trainer subclass on full logits
    student = fresh_student()
    warm = make_recipe_trainer(student, teacher, cpu_batches[: args.warmup], argparse.Namespace(**{**vars(args), "steps": args.warmup}), device)
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        warm.train()  # warm-up; also creates the optimizer state, as ours had before its measured step
    recipe_mem = extra_peak_bytes(lambda: (warm.training_step(student, batches[args.warmup]), warm.optimizer.step(), warm.optimizer.zero_grad()), device)
    trainer = make_recipe_trainer(student, teacher, cpu_batches[args.warmup + 1 :], args, device)
    sync()
    start = time.perf_counter()
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        trainer.train()
    sync()
    recipe_time = time.perf_counter() - start

    ours_tps = args.steps * tokens_per_step / ours_time
    recipe_tps = args.steps * tokens_per_step / recipe_time
    mem_source = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch profiler CPU allocator events (running sum, peak)"
    print(f"device={device} dtype={dtype} vocab={args.vocab} student={n_params / 1e6:.1f}M params "
          f"teacher hidden={args.teacher_hidden} layers={args.teacher_layers} batch={args.batch}x{args.prompt + args.response} "
          f"threads={torch.get_num_threads()}")
    print(f"extra peak memory of one step: {mem_source}")
    print(f"{'':>8} {'tokens/s':>10} {'peak MiB':>10}")
    print(f"{'recipe':>8} {recipe_tps:>10.0f} {recipe_mem / 2**20:>10.1f}")
    print(f"{'ours':>8} {ours_tps:>10.0f} {ours_mem / 2**20:>10.1f}")
    print(f"tokens_per_s_ratio={ours_tps / recipe_tps:.2f} peak_memory_ratio={ours_mem / recipe_mem:.2f}")


if __name__ == "__main__":
    main()
