"""Where a distill step's time goes: the torch profiler over the distill stage's own step.

The step is the one the distill stage runs (:class:`mydistill.training.objective.StudentObjective`
under the plain engine, the fused chunked loss) on random data, with the frozen teacher loaded in
``--teacher-dtype``. Five phases are labelled and timed over ``--steps`` profiled steps after
warm-up: the teacher's forward, the student's forward with the loss (the loss's gradient is
computed there), the backward, the optimizer step, and everything else. Then the ten operators
with the most self time.

Reported as shares of the step, so that CPU runs at small shapes say what a GPU run at real
shapes should look at first, plus the FLOP-based expectation the GPU target is stated against:
distill / fine-tune speed ≈ 6·S / (6·S + 2·T) for S student and T teacher parameters.

    python benchmarks/profile_distill_step.py                      # CPU, small shapes
    python benchmarks/profile_distill_step.py --device cuda --teacher-dtype bfloat16 \\
        --vocab 128256 --student-hidden 2048 --student-layers 16 --teacher-hidden 2048 --teacher-layers 22 --batch 16 --seq 1024
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.train_step import llama, make_batches  # noqa: E402
from mydistill.config import DistillConfig, LossConfig  # noqa: E402
from mydistill.losses import DistillObjective  # noqa: E402
from mydistill.models import count_parameters, resolve_dtype  # noqa: E402
from mydistill.training.engines import PlainEngine  # noqa: E402
from mydistill.training.objective import StudentObjective  # noqa: E402
from mydistill.training.teachers import OnlineTeachers  # noqa: E402

PHASES = ("teacher_forward", "student_forward_and_loss", "backward", "optimizer_step")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--teacher-dtype", default="auto")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--student-hidden", type=int, default=256)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--teacher-hidden", type=int, default=512)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.teacher_dtype, device)
    teacher = llama(args.vocab, args.teacher_hidden, args.teacher_layers, seed=1).to(device, dtype).eval().requires_grad_(False)
    student = llama(args.vocab, args.student_hidden, args.student_layers, seed=2).to(device).train()
    cfg = DistillConfig(steps=100, lr=1e-3, warmup_steps=0, batch_size=args.batch, loss=LossConfig())
    objective = DistillObjective(cfg.loss, student_hidden_size=args.student_hidden, student_num_layers=args.student_layers).to(device)
    engine = PlainEngine(StudentObjective(student, objective), cfg)
    half = args.seq // 2
    batches = [{k: v.to(device) for k, v in b.items()} for b in make_batches(args.warmup + args.steps, args.batch, half, args.seq - half, args.vocab, 0)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(batch):
        with torch.profiler.record_function("teacher_forward"):
            signal = OnlineTeachers([teacher]).signal(batch)
        with torch.profiler.record_function("student_forward_and_loss"):
            loss, _ = engine(batch, signal)
        with torch.profiler.record_function("backward"):
            engine.backward(loss)
        with torch.profiler.record_function("optimizer_step"):
            engine.step()

    for b in batches[: args.warmup]:
        step(b)
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for b in batches[args.warmup :]:
            step(b)
        sync()
    wall = (time.perf_counter() - start) / args.steps
    events = prof.key_averages()
    time_attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    per_phase = {name: next((getattr(e, time_attr) for e in events if e.key == name), 0.0) / 1e6 / args.steps for name in PHASES}
    tokens = args.batch * args.seq
    s_params, t_params = count_parameters(student), count_parameters(teacher)
    print(f"device={device.type} teacher_dtype={str(dtype).removeprefix('torch.')} student={s_params / 1e6:.1f}M teacher={t_params / 1e6:.1f}M "
          f"tokens/step={tokens} step={wall * 1000:.1f} ms ({tokens / wall:,.0f} tokens/s)")
    for name, seconds in per_phase.items():
        print(f"  {name:26s} {seconds * 1000:8.1f} ms  {seconds / wall:6.1%}")
    other = wall - sum(per_phase.values())
    print(f"  {'other (python, batching)':26s} {other * 1000:8.1f} ms  {other / wall:6.1%}")
    print("top operators by self time:")
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort_by, row_limit=10, max_name_column_width=40))
    expected = 6 * s_params / (6 * s_params + 2 * t_params)
    teacher_share = per_phase["teacher_forward"] / wall
    print(f"teacher_share={teacher_share:.3f} flops_teacher_share={1 - expected:.3f} expected_distill_over_finetune={expected:.3f}")


if __name__ == "__main__":
    main()
