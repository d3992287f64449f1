"""Benchmark: chunked fused KD loss vs the naive Hinton-recipe formula on full logits.

Both compute the same thing from the same inputs -- student hidden states ``(N, H)`` and head
``(V, H)`` (gradients wanted for both), teacher hidden states and head (frozen), all in ``--dtype``
(fp32 or bf16) -- forward KL at temperature T scaled by T², then backward:

* naive:    ``s = (h @ W.T).float(); t = (h_t @ W_t.T).float();
             F.kl_div(F.log_softmax(s / T), F.softmax(t / T), reduction="batchmean") * T**2``
  (the upcast is a no-op in fp32; in bf16 it is what a careful recipe does);
* chunked:  ``chunked_distill_loss(h, W, HiddenHead(h_t, W_t), mix=DistillMix(temperature=T, alpha=1))``,
  forward KL through its hand-fused form;
* autograd: the same call with the hand-fused form off (``hand_fused(False)``): the gradient by
  autograd of the divergence's table row on each chunk, as every other divergence runs. The two
  chunked columns side by side are what decides whether the hand-fused form pays;
* liger:    on CUDA, where ``liger-kernel`` is importable (optional, never a dependency),
  ``LigerFusedLinearJSD(jsd_beta=0, temperature=T)`` (beta = 0 is forward KL) on the same inputs.

Reported per (V, N): extra peak memory during forward+backward above what was allocated before
(inputs and weights), and wall time of forward+backward, with the naive/chunked ratios.

Memory is measured at the allocator, not from RSS: on CUDA ``torch.cuda.max_memory_allocated``;
on CPU the torch profiler's memory events (every c10 CPU allocation and free, with its size and
time), summed in time order, whose running maximum is the peak. Timing runs are separate,
unprofiled runs made after the profiled one (which doubles as a warm-up), alternating between the
two paths; the best of ``--repeats`` is kept. On CPU the default is one thread: on a machine shared
with other jobs, each multi-threaded op stalls at its barrier until every thread gets a time slice,
which penalises whichever path issues more ops and makes 2-thread timings swing by 5x run to run.

The memory ratio is governed by N / chunk_size: the naive path holds ~7 (N, V) fp32 tensors at its
peak, the chunked one 4 (chunk_size, V) buffers for forward KL. The CPU defaults scale N and the
chunk down together so the run takes a few minutes on 2 cores; on a GPU use e.g.
``--device cuda --tokens 4096 16384 --chunk-size 1024``.

Usage: python benchmarks/kd_loss.py [--device cpu|cuda] [--dtype fp32|bf16] [--tokens 512 1024 2048]
       [--chunk-size 128] [--threads 1] [--repeats 2]
The last line is ``peak_memory_ratio=<naive/chunked> speed_ratio=<naive/chunked>`` for V = 128,256
at the largest N.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from mydistill.losses import DistillMix, HiddenHead, chunked_distill_loss
from mydistill.losses.chunked import hand_fused

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def naive_kd(h: torch.Tensor, w: torch.Tensor, th: torch.Tensor, tw: torch.Tensor, temperature: float) -> None:
    student_logits = (h @ w.T).float()
    with torch.no_grad():
        teacher_logits = (th @ tw.T).float()
    loss = (
        F.kl_div(
            F.log_softmax(student_logits / temperature, dim=-1),
            F.softmax(teacher_logits / temperature, dim=-1),
            reduction="batchmean",
        )
        * temperature**2
    )
    loss.backward()


def chunked_kd(
    h: torch.Tensor, w: torch.Tensor, th: torch.Tensor, tw: torch.Tensor, temperature: float, chunk_size: int
) -> None:
    mix = DistillMix("forward_kl", temperature=temperature, alpha=1.0)
    chunked_distill_loss(h, w, HiddenHead(th, tw), mix=mix, chunk_size=chunk_size).loss.backward()


def autograd_kd(
    h: torch.Tensor, w: torch.Tensor, th: torch.Tensor, tw: torch.Tensor, temperature: float, chunk_size: int
) -> None:
    with hand_fused(False):
        chunked_kd(h, w, th, tw, temperature, chunk_size)


def liger_path(temperature: float) -> Callable[..., None] | None:
    """Liger's fused linear JSD at beta = 0 (forward KL), or None where it cannot run."""
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        return None
    loss_fn = LigerFusedLinearJSD(jsd_beta=0.0, temperature=temperature)

    def run(h: torch.Tensor, w: torch.Tensor, th: torch.Tensor, tw: torch.Tensor) -> None:
        (loss_fn(h, w, th, tw) * temperature**2).backward()

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler backend's start/stop lines, which it writes straight to fd 2."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def extra_peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during ``fn`` above what was allocated when it started."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def seconds(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def run_case(vocab: int, tokens: int, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[args.dtype]
    h = torch.randn(tokens, args.hidden, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, args.hidden, generator=gen) * args.hidden**-0.5).to(device, dtype).requires_grad_()
    th = torch.randn(tokens, args.teacher_hidden, generator=gen).to(device, dtype)
    tw = (torch.randn(vocab, args.teacher_hidden, generator=gen) * args.teacher_hidden**-0.5).to(device, dtype)

    def fresh(fn: Callable[[], None]) -> Callable[[], None]:
        def call() -> None:
            h.grad = None
            w.grad = None
            fn()

        return call

    paths = {
        "naive": lambda: naive_kd(h, w, th, tw, args.temperature),
        "chunked": lambda: chunked_kd(h, w, th, tw, args.temperature, args.chunk_size),
        "autograd": lambda: autograd_kd(h, w, th, tw, args.temperature, args.chunk_size),
    }
    liger = liger_path(args.temperature) if device.type == "cuda" else None
    if liger is not None:
        paths["liger"] = lambda: liger(h, w, th, tw)
    out: dict[str, float] = {}
    for name, fn in paths.items():  # the profiled run doubles as each path's warm-up
        h.grad = None
        w.grad = None
        gc.collect()
        out[f"{name}_mem"] = extra_peak_bytes(fresh(fn), device)
    # timed runs alternate between the paths and keep each one's best, so a burst of load from
    # elsewhere on the machine does not land on one path only
    for name in paths:
        out[f"{name}_s"] = float("inf") if args.repeats > 0 else float("nan")  # --repeats 0: memory only
    for _ in range(args.repeats):
        for name, fn in paths.items():
            h.grad = None
            w.grad = None
            gc.collect()
            out[f"{name}_s"] = min(out[f"{name}_s"], seconds(fresh(fn), device))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="inputs, weights and gradients")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32_000, 128_256])
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=None,
        help="N values (default: 512 1024 2048 on CPU, 4096 16384 on CUDA)",
    )
    parser.add_argument("--hidden", type=int, default=256, help="student width H")
    parser.add_argument("--teacher-hidden", type=int, default=256, help="teacher width H_t")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="tokens per chunk (default: 128 on CPU, 1024 on CUDA)"
    )
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed runs per path, alternating (best is kept); 0 measures memory only (bf16 on a CPU is slow)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on CPU: with other jobs on the cores, every multi-threaded op waits "
        "for a time slice at its barrier, a noise that grows with the number of ops; 0 = torch's choice)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if device.type == "cpu" and args.threads is None:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    args.tokens = args.tokens or ([512, 1024, 2048] if device.type == "cpu" else [4096, 16384])
    args.chunk_size = args.chunk_size or (128 if device.type == "cpu" else 1024)
    measure = (
        "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "torch profiler CPU allocator events (running sum, peak)"
    )
    dev_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    )
    print(f"device: {dev_name}; torch {torch.__version__}; {args.dtype}")
    print(f"H={args.hidden}, H_t={args.teacher_hidden}, T={args.temperature}, chunk_size={args.chunk_size}, fwd KL")
    print(f"extra peak memory: {measure}; time: forward+backward wall clock, best of {args.repeats} after a warm-up")
    liger_note = "" if device.type != "cuda" else " | liger MiB, s" if liger_path(1.0) else " (liger-kernel not importable)"
    header = (
        f"{'V':>8} {'N':>6} | {'naive MiB':>10} {'chunked MiB':>11} {'mem ratio':>9} | "
        f"{'naive s':>8} {'chunked s':>9} {'speed ratio':>11} | {'autograd MiB':>12} {'autograd s':>10}{liger_note}"
    )
    print(header)
    print("-" * len(header))
    last: dict[str, float] | None = None
    fused_gain: list[float] = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            r = run_case(vocab, tokens, args, device)
            mem_ratio = r["naive_mem"] / max(r["chunked_mem"], 1)
            speed_ratio = r["naive_s"] / r["chunked_s"]
            fused_gain.append(r["autograd_s"] / r["chunked_s"])
            mib = {k[:-4]: v / 2**20 for k, v in r.items() if k.endswith("_mem")}
            liger_cols = f" | {mib['liger']:>9.0f} {r['liger_s']:>8.3f}" if "liger_s" in r else ""
            print(
                f"{vocab:>8} {tokens:>6} | {mib['naive']:>10.0f} {mib['chunked']:>11.0f} {mem_ratio:>9.2f} | "
                f"{r['naive_s']:>8.2f} {r['chunked_s']:>9.2f} {speed_ratio:>11.2f} | "
                f"{mib['autograd']:>12.0f} {r['autograd_s']:>10.2f}{liger_cols}",
                flush=True,
            )
            if vocab == 128_256:
                last = {"mem": mem_ratio, "speed": speed_ratio, "tokens": tokens}
    if args.repeats > 0:
        print(f"hand-fused forward KL vs autograd per chunk: {min(fused_gain):.2f}x to {max(fused_gain):.2f}x faster")
    if last is None:
        print("(V = 128,256 not in --vocab: no summary line)")
        return
    print(f"summary for V=128256, N={last['tokens']:.0f}:")
    print(f"peak_memory_ratio={last['mem']:.2f} speed_ratio={last['speed']:.2f}")


if __name__ == "__main__":
    main()
