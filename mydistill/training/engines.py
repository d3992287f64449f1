"""Processes and engines: the process group, and one interface over a plain optimizer or DeepSpeed.

:class:`PlainEngine` (one process, or DDP across several) and :class:`DeepSpeedEngine` (ZeRO-3:
parameters, gradients and optimizer state sharded, optionally offloaded) both wrap the student and
the objective's learned parts as one module, step with AdamW under warmup + cosine, and save and
load checkpoints the same way.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from mydistill import io
from mydistill.config import REPO_ROOT, TrainConfig
from mydistill.training.process import import_deepspeed

if TYPE_CHECKING:
    from mydistill.training.objective import StudentObjective


def world() -> tuple[int, int]:
    """(rank, world size) of this process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return world()[0] == 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def init_distributed(device: torch.device, use_deepspeed: bool) -> None:
    """Join the process group a launcher set up (``WORLD_SIZE`` > 1); gloo on CPU, nccl on GPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if use_deepspeed:
        import_deepspeed().init_distributed(dist_backend=backend)  # (with the CPU-only ops switched off)
    else:
        dist.init_process_group(backend=backend)


def read_deepspeed_file(path: str) -> dict[str, Any]:
    """The DeepSpeed config file at ``path``: a URI, an absolute path, or relative to the working
    directory, else to the repository (the presets name ``deploy/deepspeed/…``)."""
    if not io.exists(path) and (REPO_ROOT / path).exists():
        path = str(REPO_ROOT / path)
    return io.read_json(path)


def deepspeed_config(path_or_dict: str | dict[str, Any], cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """A DeepSpeed config (a file, see :func:`read_deepspeed_file`, or its content) with its ``"auto"`` values filled in."""
    # a copy: the "auto" values below are filled in nested sections, and the job's own content stays as written
    config = copy.deepcopy(path_or_dict) if isinstance(path_or_dict, dict) else read_deepspeed_file(path_or_dict)
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    config.pop("train_batch_size", None)
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = cfg.grad_clip
    bf16 = config.get("bf16", {})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = device.type == "cuda" and torch.cuda.is_bf16_supported()
        config["bf16"] = bf16
    if config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu":
        # we bring torch's AdamW; DeepSpeed's CPU Adam would be compiled first (minutes)
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    config.setdefault("zero_allow_untested_optimizer", True)
    return config


@contextlib.contextmanager
def zero3_loading(ds_config: dict[str, Any]) -> Iterator[Any]:
    """Inside the block, transformers' from_pretrained loads a model straight into its ZeRO-3
    shards instead of whole on every process (what a 7B student needs)."""
    import_deepspeed()
    from transformers.integrations import HfDeepSpeedConfig

    # transformers holds this config by a weak reference only: the block keeps it alive
    config = HfDeepSpeedConfig(ds_config)
    yield config


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def schedule(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule


class PlainEngine:
    """One process, or plain DDP-free data parallel: AdamW, warmup + cosine, clipping, checkpoints."""

    def __init__(self, module: StudentObjective, cfg: TrainConfig):
        self.module = module
        self.cfg = cfg
        # several processes without DeepSpeed: plain data parallel (gradients all-reduced)
        self.forward_module = torch.nn.parallel.DistributedDataParallel(module) if world()[1] > 1 else module
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))

    def __call__(self, *args: Any) -> Any:
        return self.forward_module(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        if not is_main_process():  # every rank holds the same replica
            return
        state = {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "client_state": client_state,
        }
        os.makedirs(os.path.join(directory, tag), exist_ok=True)
        with io.atomic_open(os.path.join(directory, tag, "state.pt"), "wb") as f:
            torch.save(state, f)

    def load_checkpoint(self, directory: str, tag: str) -> dict[str, Any] | None:
        state = torch.load(os.path.join(directory, tag, "state.pt"), weights_only=False)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["client_state"]

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.student.state_dict()


class DeepSpeedEngine:
    """The same interface over a DeepSpeed engine (ZeRO-3: parameters, gradients and optimizer
    state sharded across processes; optionally offloaded to CPU)."""

    def __init__(self, module: StudentObjective, cfg: TrainConfig, ds_config: dict[str, Any]):
        deepspeed = import_deepspeed()
        deepspeed.zero.register_external_parameter(module, module.student.lm_head.weight)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.module = module

    def __call__(self, *args: Any) -> Any:
        return self.engine(*args)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()  # clips (gradient_clipping), steps the optimizer and the scheduler
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        # `latest` is the CheckpointStore's to write, once every rank's files are in place
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)

    def load_checkpoint(self, directory: str, tag: str) -> dict[str, Any] | None:
        _, client_state = self.engine.load_checkpoint(directory, tag=tag)
        return client_state

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The consolidated (gathered) 16-bit student weights; complete on rank 0 only."""
        full = self.engine._zero3_consolidated_16bit_state_dict() or {}
        prefix = "student."
        return {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
