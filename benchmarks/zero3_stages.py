"""Both training stages under DeepSpeed ZeRO-3, launched as the pipeline launches them.

Builds a teacher and a student (~100M parameters by default) from configs, writes a synthetic
prompt/response dataset, runs stage 1 (distill from the online teacher) and stage 2 (fine-tune
from stage 1's checkpoint) through :func:`mydistill.training.launch.launch_training`, and prints per stage
the measured tokens/s, step time, peak memory and MFU (model FLOPs utilisation: training FLOPs of
the student, 6 per parameter per token, over the GPU's dense bf16 peak; for stage 1 also with the
teacher's forward, 2 per teacher parameter per token).

    python benchmarks/zero3_stages.py                      # GPU: deepspeed launcher, bf16
    python benchmarks/zero3_stages.py --tiny --device cpu  # a CPU smoke run with gloo
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mydistill import io  # noqa: E402
from mydistill.config import DistillConfig, TrainConfig  # noqa: E402
from mydistill.training.launch import launch_training  # noqa: E402
from mydistill.training.job import TrainJob  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# dense bf16 peak per GPU (no sparsity), for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name(0)
    return name, next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--launcher", default="deepspeed", choices=["deepspeed", "torchrun"])
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--deepspeed", default="deploy/deepspeed/zero3.json")
    p.add_argument("--student", default="768x12", help="hidden x layers")
    p.add_argument("--teacher", default="1024x16", help="hidden x layers")
    p.add_argument("--seq", type=int, default=512, help="tokens per example (half prompt, half response)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--examples", type=int, default=2048)
    p.add_argument("--tiny", action="store_true", help="small models and sequences (CPU smoke run)")
    args = p.parse_args()
    if args.tiny:
        args.student, args.teacher, args.seq, args.batch, args.steps, args.examples = "64x2", "96x2", 64, 4, 6, 64

    from mydistill.demo.tokenizer import build_tokenizer
    from mydistill.models import build_model, count_parameters

    work = tempfile.mkdtemp(prefix="zero3-stages-")
    tokenizer = build_tokenizer()

    def arch(spec: str) -> dict:
        hidden, layers = (int(x) for x in spec.split("x"))
        return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                    intermediate_size=hidden * 4, max_position_embeddings=max(2 * args.seq, 64), tie_word_embeddings=False)

    teacher_dir = os.path.join(work, "teacher")
    teacher = build_model(arch(args.teacher), tokenizer, seed=1)
    n_teacher = count_parameters(teacher)
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    del teacher
    n_student = count_parameters(build_model(arch(args.student), tokenizer, seed=0))

    rng = random.Random(0)
    half = args.seq // 2 - 3  # room for the chat template's special tokens
    letters = "abcdefghijklmnopqrstuvwxyz"
    data = os.path.join(work, "train.jsonl")
    io.write_records(data, [
        {"prompt": "".join(rng.choice(letters) for _ in range(half)), "response": "".join(rng.choice(letters) for _ in range(half))}
        for _ in range(args.examples)
    ])

    common = dict(batch_size=args.batch, steps=args.steps, lr=3e-4, warmup_steps=5, log_every=5, max_length=args.seq,
                  launcher=args.launcher, num_processes=args.num_processes, deepspeed=os.path.join(REPO, args.deepspeed),
                  device=args.device)
    stage1 = TrainJob(stage="distill", data_uri=data, output_uri=os.path.join(work, "distill"), tokenizer_uri=teacher_dir,
                      teacher_uri=teacher_dir, arch=arch(args.student), train=DistillConfig(**common).model_dump())
    stage2 = TrainJob(stage="finetune", data_uri=data, output_uri=os.path.join(work, "finetune"), tokenizer_uri=teacher_dir,
                      init_uri=os.path.join(work, "distill"), train=TrainConfig(**common).model_dump())

    gpu, peak = peak_flops()
    print(f"device: {gpu}; student {n_student / 1e6:.1f}M params, teacher {n_teacher / 1e6:.1f}M; "
          f"{args.num_processes} process(es), {args.launcher}, {args.deepspeed}; batch {args.batch} x {args.seq} tokens")
    print(f"{'stage':>9} {'tokens/s':>10} {'step s':>8} {'peak MiB':>9} {'MFU':>7} {'MFU+teacher':>12} {'wall s':>7}")
    for job, teacher_params in ((stage1, n_teacher), (stage2, 0)):
        start = time.perf_counter()
        manifest = launch_training(job)
        wall = time.perf_counter() - start
        steady = [h for h in manifest["history"] if h["step"] > 5] or manifest["history"]
        tps = sum(h["tokens_per_s"] for h in steady) / len(steady)
        step_s = sum(h["step_time_s"] for h in steady) / len(steady)
        mem = max(h["peak_memory_mb"] for h in manifest["history"])
        mfu = tps * 6 * n_student / peak if peak else float("nan")
        mfu_t = tps * (6 * n_student + 2 * teacher_params) / peak if peak else float("nan")
        print(f"{job.stage:>9} {tps:>10.0f} {step_s:>8.3f} {mem:>9.0f} {mfu:>7.1%} {mfu_t:>12.1%} {wall:>7.0f}")


if __name__ == "__main__":
    main()
