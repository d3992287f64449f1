"""The training entrypoint for both stages: ``python -m mydistill.train --job job.json``.

setup → train → save, top to bottom. Stage 1 (``distill``) learns from the frozen teacher's
signal through :class:`mydistill.losses.DistillObjective`; stage 2 (``finetune``), the baseline
and the demo teacher's own bootstrap use the same loop with cross-entropy only.

One process, or one process per device under a launcher (``torchrun`` / ``deepspeed``; see
:mod:`mydistill.launch`). With a DeepSpeed config the student is sharded by ZeRO-3; the frozen
teacher is loaded before the engine exists, so it is never partitioned by accident. Only rank 0
logs and writes the final model. Periodic checkpoints hold the engine, optimizer, scheduler, data
position and RNG, and a run started again on the same output resumes from the latest one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from mydistill import io
from mydistill.config import REPO_ROOT, RUN_ONLY_FIELDS, DistillConfig, TrainConfig
from mydistill.cross_tokenizer import ULDObjective, ULDTeacher, check_tokenizers_agree
from mydistill.losses import DistillObjective, LossConfig, LossOutput
from mydistill.models import build_model, count_parameters, load_model, load_tokenizer
from mydistill.on_policy import OnPolicyMixer, eos_ids_of
from mydistill.online_teachers import OnlineTeachers, load_extra_teachers
from mydistill.signal.source import TeacherSource, online_signal
from mydistill.step_by_step import LABEL_ROWS, StepByStepObjective, step_by_step_examples
from mydistill.tokenization import (
    PROMPT_PREFIX_KEY, TokenizedExample, collate, prompt_prefix_of, shift_labels, tokenize_example, with_prefix,
)

Stage = Literal["distill", "finetune", "baseline", "teacher"]
MetricsCallback = Callable[[dict[str, float], int], None]
CHECKPOINTS_SUFFIX = ".checkpoints"


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, no usable data); the message says why."""


@dataclass
class TrainJob:
    """Everything one training run needs; JSON-serialisable so a launcher can hand it to workers."""

    stage: Stage
    data_uri: str
    output_uri: str
    tokenizer_uri: str
    train: dict[str, Any]
    val_uri: str | None = None
    init_uri: str | None = None
    arch: dict[str, Any] | None = None
    teacher_uri: str | None = None
    signal_uris: list[str] = field(default_factory=list)  # teacher-signal stores read instead of the teacher
    mlflow_run_id: str | None = None
    checkpoint_dir: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)

    def train_config(self) -> TrainConfig:
        return (DistillConfig if self.stage == "distill" else TrainConfig).model_validate(self.train)

    def checkpoints(self) -> str:
        """Where periodic checkpoints go: beside a local output, or a local cache for a remote one."""
        if self.checkpoint_dir:
            return self.checkpoint_dir
        if io.is_remote(self.output_uri):
            key = io.sha256_of(self.output_uri)[:16]
            return os.path.join(os.path.expanduser("~"), ".cache", "mydistill", "checkpoints", key)
        return self.output_uri.rstrip("/") + CHECKPOINTS_SUFFIX

    def to_json(self) -> str:
        return json.dumps(asdict(self))


# ----------------------------------------------------------------------------------------------
# processes


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
        _import_deepspeed().init_distributed(dist_backend=backend)  # (with the CPU-only ops switched off)
    else:
        dist.init_process_group(backend=backend)


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("DeepSpeed is not installed: run `make setup` (or `pip install deepspeed`)") from e
    if not torch.cuda.is_available():
        # the shared-memory comm op is JIT-compiled on first use and needs a compiler toolchain;
        # on CPU the gloo backend does the same job
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def deepspeed_config(path_or_dict: str | dict[str, Any], cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """A DeepSpeed config from a file in ``deploy/deepspeed/`` with its ``"auto"`` values filled in."""
    if isinstance(path_or_dict, str) and not io.exists(path_or_dict) and (REPO_ROOT / path_or_dict).exists():
        path_or_dict = str(REPO_ROOT / path_or_dict)  # presets name configs relative to the repository
    config = dict(path_or_dict) if isinstance(path_or_dict, dict) else io.read_json(path_or_dict)
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


# ----------------------------------------------------------------------------------------------
# data


def read_training_records(uri: str) -> list[dict[str, Any]]:
    """The ``prompt``/``response`` records at ``uri``; a DataError names the file and the record when
    one lacks a field, or the file when it has none."""
    records = io.read_records(uri)
    for i, r in enumerate(records):
        if "prompt" not in r or "response" not in r:
            raise io.DataError(f"{uri}: record {i + 1} needs 'prompt' and 'response' fields (has {sorted(r)})")
    if not records:
        raise io.DataError(f"{uri}: no training records")
    return records


def tokenize_records(records: list[dict[str, Any]], tokenizer: Any, max_length: int, prompt_prefix: str = "") -> list[TokenizedExample]:
    """Tokenized records; ``prompt_prefix`` goes before every prompt (a task prefix)."""
    return [tokenize_example(tokenizer, with_prefix(prompt_prefix, r["prompt"]), r["response"], max_length) for r in records]


def load_examples(uri: str, tokenizer: Any, max_length: int, prompt_prefix: str = "") -> list[TokenizedExample]:
    """Tokenized ``prompt``/``response`` records from ``uri`` (see :func:`read_training_records`)."""
    return tokenize_records(read_training_records(uri), tokenizer, max_length, prompt_prefix)


def batch_indices(num_examples: int, batch_size: int, seed: int, *, start_step: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[list[int]]:
    """Example indices of this rank's share of each global batch, from step ``start_step`` on.

    One seeded permutation per epoch; global batch s is ``world_size * batch_size`` consecutive
    indices of it, and rank r takes the r-th slice. Resuming at step k replays only the
    permutations (no tokenizing or collating), so the data position is exactly where it was.
    """
    global_batch = batch_size * world_size
    per_epoch = max(1, num_examples // global_batch)
    generator = torch.Generator().manual_seed(seed)
    epoch = 0
    order = torch.randperm(num_examples, generator=generator).tolist()
    step = 0
    while True:
        if step // per_epoch > epoch:
            epoch += 1
            order = torch.randperm(num_examples, generator=generator).tolist()
        if step >= start_step:
            start = (step % per_epoch) * global_batch + rank * batch_size
            chunk = order[start : start + batch_size]
            if len(chunk) < batch_size:  # fewer examples than one global batch: wrap around
                chunk = [order[(start + i) % num_examples] for i in range(batch_size)]
            yield chunk
        step += 1


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def schedule(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule


# Dense bf16 peak TFLOP/s per device, matched against torch.cuda.get_device_name (first match wins)
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("GH200", 989.0),
                    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0)]


def peak_tflops(cfg: TrainConfig, device: torch.device) -> float:
    """One device's peak TFLOP/s for MFU: ``train.peak_tflops``, else a known GPU's dense bf16
    peak, else 0 (no MFU: CPUs and unknown GPUs)."""
    if cfg.peak_tflops:
        return cfg.peak_tflops
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), 0.0)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # CPU: the process's peak resident set (ru_maxrss is in KiB on Linux)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------
# the trained module and its engines


class StudentObjective(torch.nn.Module):
    """The student and the objective's learned parts as one module, so one engine wraps both.

    The forward never materialises full-vocabulary logits: the objective projects the final
    hidden states chunk by chunk (full (B, T, V) logits dominate peak memory at real vocabulary
    sizes). Under ZeRO-3 the output projection is used outside its own module's forward, so it
    is registered as an external parameter of this module; the forward returns the loss as a
    plain tensor (with the metrics beside it) so that ZeRO-3 hooks it and gathers that parameter
    again for the backward pass, where the fused loss hands over its gradient.
    """

    def __init__(self, student: Any, objective: DistillObjective):
        super().__init__()
        self.student = student
        self.objective = objective
        # layer-wise distillation (distill.loss.hidden) needs every layer's hidden states
        self.wants_hidden_states = getattr(getattr(objective, "cfg", None), "hidden", None) is not None

    def forward(self, batch: dict[str, torch.Tensor], teacher_signal: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        student_out = self.student.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=self.wants_hidden_states
        )
        if self.wants_hidden_states:
            teacher_signal = {**teacher_signal, "student_hidden_states": student_out.hidden_states}
        out = self.objective(
            student_hidden=student_out.last_hidden_state,
            student_head_weight=self.student.lm_head.weight,
            labels=shift_labels(batch["labels"]),
            attention_mask=batch["attention_mask"],
            **teacher_signal,
        )
        return out.loss, out.metrics


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
        io.write_text(os.path.join(directory, "latest"), tag)

    def load_checkpoint(self, directory: str) -> dict[str, Any] | None:
        tag = _latest_tag(directory)
        if tag is None:
            return None
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
        deepspeed = _import_deepspeed()
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
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state)

    def load_checkpoint(self, directory: str) -> dict[str, Any] | None:
        if _latest_tag(directory) is None:
            return None
        _, client_state = self.engine.load_checkpoint(directory)
        return client_state

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The consolidated (gathered) 16-bit student weights; complete on rank 0 only."""
        full = self.engine._zero3_consolidated_16bit_state_dict() or {}
        prefix = "student."
        return {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}


def _latest_tag(directory: str) -> str | None:
    latest = os.path.join(directory, "latest")
    return open(latest).read().strip() if os.path.exists(latest) else None


# ----------------------------------------------------------------------------------------------
# one step


def teacher_signal(
    teacher: Any, batch: dict[str, torch.Tensor], indices: list[int] | None = None, hidden_states: bool = False
) -> dict[str, Any]:
    """The frozen teacher's signal for a batch: its final hidden states and output projection
    (the objective computes teacher logits chunk by chunk, like the student's), or, from a
    :class:`~mydistill.signal.source.TeacherSource`, a stored top-k teacher or a ULD signal for
    the examples at ``indices``. Several online teachers (:class:`OnlineTeachers`) give one entry each."""
    if isinstance(teacher, TeacherSource):
        return teacher.signal(batch, indices)
    if isinstance(teacher, OnlineTeachers):
        return teacher.signal(batch, hidden_states=hidden_states)
    return online_signal(teacher, batch, hidden_states=hidden_states)


def forward_loss(engine: Any, batch: dict[str, torch.Tensor], teacher: Any | None, indices: list[int] | None = None) -> Any:
    """Loss for one batch: the teacher's signal, then the student and objective under the engine."""
    signal = teacher_signal(teacher, batch, indices, hidden_states=engine.module.wants_hidden_states)
    if LABEL_ROWS in batch:  # distilling step-by-step: the objective splits the label and rationale rows
        signal = {**signal, "label_rows": batch[LABEL_ROWS]}
    loss, metrics = engine(batch, signal)
    return LossOutput(loss, metrics)


@torch.no_grad()
def validation_loss(student: Any, examples: list[TokenizedExample], pad_token_id: int, device: torch.device) -> float:
    """Mean next-token cross-entropy over response tokens of ``examples``."""
    from mydistill.evaluate import response_logits

    student.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), 64):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + 64], pad_token_id).items()}
        logits, labels = response_logits(student, batch)
        total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        count += labels.numel()
    student.train()
    return total / max(count, 1)


def _global_sum(value: float, device: torch.device) -> float:
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


# ----------------------------------------------------------------------------------------------
# the run


def run_training(job: TrainJob, on_metrics: MetricsCallback | None = None, progress: bool = False) -> dict[str, Any]:
    """Train as ``job`` says and save a Hugging Face folder (safetensors + tokenizer) at ``job.output_uri``.

    Returns the output's manifest. A finished output made from the same inputs is reused; an
    unfinished one with checkpoints resumes from the latest.
    """
    cfg = job.train_config()
    inputs = {**job.inputs, "stage": job.stage, "train": cfg.model_dump(exclude=RUN_ONLY_FIELDS),
              "init_uri": job.init_uri, "arch": job.arch, "teacher_uri": job.teacher_uri,
              **({"signal_uris": job.signal_uris} if job.signal_uris else {})}
    done = io.manifest_matches(job.output_uri, inputs)
    if done:
        return done

    # ---- setup
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    use_deepspeed = cfg.deepspeed is not None
    init_distributed(device, use_deepspeed)
    rank, world_size = world()
    torch.manual_seed(cfg.seed)
    # The frozen teacher is loaded first, before any ZeRO-3 config exists, so it is never
    # partitioned by accident.
    tokenizer = load_tokenizer(job.tokenizer_uri)
    distill = cfg if isinstance(cfg, DistillConfig) else None
    ds_config = deepspeed_config(cfg.deepspeed, cfg, device) if use_deepspeed else None
    method = distill.cross_tokenizer.method if distill else "none"
    teacher = teacher_tokenizer = None
    if job.teacher_uri:
        # before anything heavy: the same ids must mean the same strings, unless a cross-tokenizer method is set
        teacher_tokenizer = load_tokenizer(job.teacher_uri)
        check_tokenizers_agree(teacher_tokenizer, tokenizer, method=method)
        if _needs_teacher_model(job, distill):
            teacher = _load_teacher(job.teacher_uri, distill, ds_config, device)
    extra_teachers = _load_extra_teachers(job, distill, teacher, tokenizer, ds_config, device)
    online_teacher = OnlineTeachers([teacher, *extra_teachers]) if extra_teachers else teacher
    records = read_training_records(job.data_uri)  # read once: stores, ULD and the examples all use them
    source = online_teacher if extra_teachers else _teacher_source(job, distill, records, teacher, teacher_tokenizer, tokenizer)
    zero3_loading = _zero3_loading(ds_config) if ds_config and job.init_uri else None  # noqa: F841 (kept alive)
    student = _load_student(job, cfg, tokenizer, device)
    student.train()
    if teacher is not None and method == "none":
        _match_head_rows(teacher, student.config.vocab_size)
    for extra in extra_teachers:
        _match_head_rows(extra, student.config.vocab_size)
    loss_cfg = cfg.loss if isinstance(cfg, DistillConfig) else LossConfig(alpha=0.0)
    objective = DistillObjective(
        loss_cfg,
        student_hidden_size=student.config.hidden_size,
        student_num_layers=student.config.num_hidden_layers,
        teacher_hidden_size=teacher.config.hidden_size if teacher is not None and method == "none" else None,
        teacher_num_layers=teacher.config.num_hidden_layers if teacher is not None and method == "none" else None,
    ).to(device)
    trained_objective = ULDObjective(objective, distill.cross_tokenizer) if distill and method == "uld" else objective
    # distilling step-by-step: a label and a rationale task per step; the student then answers behind
    # the label prefix, which its checkpoint records (a stage trained from it inherits the prefix)
    step_by_step = distill.loss.step_by_step if distill else None
    prompt_prefix = step_by_step.label_prefix if step_by_step else prompt_prefix_of(job.init_uri)
    tasks = None
    if step_by_step is not None:
        trained_objective = StepByStepObjective(trained_objective)
        tasks = step_by_step_examples(records, tokenizer, cfg.max_length, step_by_step, job.data_uri)
    examples = tasks.label if tasks else tokenize_records(records, tokenizer, cfg.max_length, prompt_prefix)
    val_examples = load_examples(job.val_uri, tokenizer, cfg.max_length, prompt_prefix) if job.val_uri else []
    # TED stage 1 before the engine exists, so that ZeRO-3 partitions the trained teacher filters
    ted_metrics = _fit_teacher_filters(job, distill, objective, teacher, examples, tokenizer, device, inputs, on_metrics)
    n_params = count_parameters(student)
    module = StudentObjective(student, trained_objective)
    engine = DeepSpeedEngine(module, cfg, ds_config) if ds_config else PlainEngine(module, cfg)

    checkpoint_dir = job.checkpoints()
    start_step, history = 0, []
    client_state = engine.load_checkpoint(checkpoint_dir) if cfg.resume else None
    if client_state and client_state.get("inputs_sha256") != io.sha256_of(inputs):
        raise TrainingError(
            f"{checkpoint_dir} holds checkpoints of a run with other inputs; delete it or set a new output"
        )
    if client_state:
        start_step, history = client_state["step"], client_state["history"]
        torch.set_rng_state(client_state["rng"])
        if is_main_process():
            print(f"[mydistill] {job.stage}: resumed from step {start_step} ({checkpoint_dir})", flush=True)
    order = batch_indices(len(examples), cfg.batch_size, cfg.seed, start_step=start_step, rank=rank, world_size=world_size)
    if tasks is not None:  # the rationale examples in their own seeded order, resumed like the label order
        tasks.rationale_order = batch_indices(
            len(tasks.rationale), cfg.batch_size, cfg.seed + 1, start_step=start_step, rank=rank, world_size=world_size
        )
    on_policy = None
    if distill is not None and distill.on_policy.fraction > 0:
        if teacher is None:
            raise ValueError("distill.on_policy.fraction > 0 needs the online teacher to score the student's samples (teacher_uri)")
        on_policy = OnPolicyMixer(distill.on_policy, tokenizer=tokenizer, eos_token_ids=eos_ids_of(student, tokenizer))
        on_policy.skip(start_step)  # a resumed run makes the same on-policy choices as an uninterrupted one

    # MFU: model FLOPs (6 per parameter per token for the trained student, 2 for a teacher forward)
    # against the devices' peak; logged where the peak is known (GPUs)
    peak_flops = peak_tflops(cfg, device) * 1e12
    teachers_run = [t for t in (teacher, *extra_teachers) if t is not None] if not job.signal_uris else []
    teacher_parameters = sum(count_parameters(t) for t in teachers_run)
    flops_per_token = 6 * n_params + 2 * teacher_parameters

    # ---- train
    window_tokens, window_start = 0.0, time.perf_counter()
    bar = _progress_bar(progress and is_main_process(), job.stage, cfg.steps, start_step)
    for step in range(start_step + 1, cfg.steps + 1):
        step_start = time.perf_counter()
        indices = next(order)
        rows = [examples[i] for i in indices]
        batch = tasks.collate(rows, tokenizer.pad_token_id) if tasks else collate(rows, tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        if on_policy is not None and on_policy.draw():
            # GKD: the student answers these prompts itself; the online teacher scores its tokens
            batch = on_policy.replace(batch, student, step, synced_gpus=use_deepspeed and world_size > 1)
            with on_policy.active(objective):
                out = forward_loss(engine, batch, online_teacher)
        else:
            out = forward_loss(engine, batch, source, indices)
        if not torch.isfinite(out.loss):
            last = _latest_tag(checkpoint_dir)
            raise TrainingError(
                f"{job.stage}: loss is {out.loss.item()} at step {step}; stopping. "
                + (f"The last good checkpoint ({last}) is kept in {checkpoint_dir}. " if last else "")
                + f"Lower the learning rate (now {cfg.lr}) or check the data at {job.data_uri}"
            )
        engine.backward(out.loss)
        grad_norm = engine.step()
        window_tokens += float(batch["attention_mask"].sum())
        if bar is not None:
            bar[0].update(bar[1], advance=1, description=f"{job.stage} loss={out.loss.item():.3f}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - window_start
            metrics = {
                "loss": out.loss.item(),
                **{k: float(v) for k, v in out.metrics.items()},
                "lr": engine.lr(),
                "grad_norm": grad_norm,
                "tokens_per_s": _global_sum(window_tokens, device) / elapsed,
                "step_time_s": time.perf_counter() - step_start,
                "peak_memory_mb": peak_memory_mb(device),
                **({"on_policy_batches": float(on_policy.sampled_batches)} if on_policy is not None else {}),
            }
            if peak_flops:
                metrics["mfu"] = flops_per_token * metrics["tokens_per_s"] / (peak_flops * world_size)
            if val_examples and (step % cfg.eval_every == 0 or step == cfg.steps):
                # under ZeRO-3 every rank runs the same forward passes (each gathers the student's shards)
                metrics["val_loss"] = validation_loss(student, val_examples, tokenizer.pad_token_id, device)
            history.append({"step": step, **metrics})
            if on_metrics is not None and is_main_process():
                on_metrics(metrics, step)
            window_tokens, window_start = 0.0, time.perf_counter()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            engine.save_checkpoint(checkpoint_dir, f"step{step}", {"step": step, "history": history, "rng": torch.get_rng_state(), "inputs_sha256": io.sha256_of(inputs)})
            _prune_checkpoints(checkpoint_dir, keep=2)
    if bar is not None:
        bar[0].stop()

    # ---- save
    state_dict = engine.student_state_dict()  # a collective under ZeRO-3: every rank takes part
    manifest: dict[str, Any] = {}
    if is_main_process():
        manifest = save_checkpoint(
            student, tokenizer, job.output_uri, stage=job.stage, inputs=inputs, state_dict=state_dict,
            final_metrics=history[-1], parameters=n_params, history=history, world_size=world_size,
            deepspeed=bool(use_deepspeed),
            **({"teacher_sharding": teacher.partition_stats()} if hasattr(teacher, "partition_stats") else {}),
            **({PROMPT_PREFIX_KEY: prompt_prefix} if prompt_prefix else {}),
            **ted_metrics,
        )
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    if world_size > 1:
        dist.barrier()
    return manifest


TED_FILTERS_FILE = "ted_teacher_filters.pt"


def _fit_teacher_filters(
    job: TrainJob, distill: DistillConfig | None, objective: DistillObjective, teacher: Any,
    examples: list[TokenizedExample], tokenizer: Any, device: torch.device, inputs: dict[str, Any],
    on_metrics: MetricsCallback | None,
) -> dict[str, float]:
    """TED stage 1 (``distill.loss.hidden.teacher_filter_steps`` > 0): train the objective's teacher
    filters on this stage's examples with the online teacher frozen (see :mod:`mydistill.losses.ted`).

    Every rank sees the same seeded batches and ends with rank 0's filters. The trained filters are
    kept beside the periodic checkpoints, so a resumed run reloads them instead of training again.
    Returns ``ted_filter_ce_start`` / ``ted_filter_ce_end`` / ``ted_filter_steps`` for the manifest
    ({} when stage 1 is off).
    """
    hidden = distill.loss.hidden if distill is not None else None
    if hidden is None or hidden.projection != "ted" or hidden.teacher_filter_steps == 0:
        return {}
    assert distill is not None and objective.hidden is not None
    if teacher is None:
        raise ValueError(
            "distill.loss.hidden.teacher_filter_steps > 0 trains the TED teacher filters on the online teacher, "
            "but this job has none (teacher_uri, not teacher-signal stores)"
        )
    from mydistill.losses.ted import fit_teacher_filters

    saved_path = os.path.join(job.checkpoints(), TED_FILTERS_FILE)
    inputs_sha256 = io.sha256_of(inputs)
    if distill.resume and os.path.exists(saved_path):
        saved = torch.load(saved_path, map_location=device, weights_only=True)
        if saved["inputs_sha256"] == inputs_sha256:
            objective.hidden.load_teacher_filters(saved["filters"])
            if is_main_process():
                print(f"[mydistill] distill: TED teacher filters reloaded from {saved_path}", flush=True)
            return saved["metrics"]
    order = batch_indices(len(examples), distill.batch_size, distill.seed)
    batches = (
        {k: v.to(device) for k, v in collate([examples[i] for i in next(order)], tokenizer.pad_token_id).items()}
        for _ in range(hidden.teacher_filter_steps)
    )
    started = time.perf_counter()
    fit = fit_teacher_filters(
        objective.hidden, teacher, batches, steps=hidden.teacher_filter_steps, lr=hidden.teacher_filter_lr,
        ignore_index=distill.loss.ignore_index, chunk_size=distill.loss.chunk_size,
    )
    metrics = {"ted_filter_ce_start": fit.ce_start, "ted_filter_ce_end": fit.ce_end,
               "ted_filter_steps": float(hidden.teacher_filter_steps)}
    if is_main_process():
        print(
            f"[mydistill] distill: TED teacher filters trained for {hidden.teacher_filter_steps} steps, "
            f"CE {fit.ce_start:.4f} -> {fit.ce_end:.4f} ({time.perf_counter() - started:.1f}s)",
            flush=True,
        )
        if on_metrics is not None:
            on_metrics(metrics, 0)
        if distill.save_every:  # checkpoints will be written: keep the filters for a resumed run
            os.makedirs(job.checkpoints(), exist_ok=True)
            state = {"inputs_sha256": inputs_sha256, "metrics": metrics,
                     "filters": {k: v.cpu() for k, v in objective.hidden.teacher_filters.state_dict().items()}}
            with io.atomic_open(saved_path, "wb") as f:
                torch.save(state, f)
    return metrics


def _match_head_rows(teacher: Any, vocab_size: int) -> None:
    """Drop padding rows of the teacher's output projection beyond the student's vocabulary.

    Models of one family often pad their heads to different sizes (Qwen2.5-7B has 152,064 rows,
    0.5B 151,936) while sharing one tokenizer, whose ids all lie below both sizes (checked before
    this point), so the extra rows are never a real token's.
    """
    weight = teacher.lm_head.weight
    if weight.shape[0] > vocab_size:
        teacher.lm_head.weight = torch.nn.Parameter(weight[:vocab_size].detach(), requires_grad=False)


def _load_teacher(uri: str, distill: DistillConfig | None, ds_config: dict[str, Any] | None, device: torch.device) -> Any:
    """The frozen teacher: whole on every process, or (``distill.teacher_sharding: zero3``)
    partitioned across them by ZeRO-3 inference, for a teacher too large for one device."""
    if distill is not None and distill.teacher_sharding == "zero3":
        assert ds_config is not None  # DistillConfig refuses teacher_sharding: zero3 without deepspeed
        _import_deepspeed()
        from mydistill.zero_inference import ShardedTeacher

        return ShardedTeacher(uri, ds_config, device)
    return load_model(uri, device=device).eval().requires_grad_(False)


def _load_extra_teachers(
    job: TrainJob, distill: DistillConfig | None, teacher: Any, tokenizer: Any, ds_config: dict[str, Any] | None,
    device: torch.device,
) -> list[Any]:
    """``distill.extra_teachers``, loaded like the main teacher once their tokenizers are checked."""
    if distill is None or not distill.extra_teachers:
        return []
    if job.signal_uris:
        raise ValueError(
            "distill.extra_teachers are online teachers, but this job reads teacher-signal stores; give the other "
            "teachers' stores as signal.extra_uris instead"
        )
    if teacher is None:
        raise ValueError("distill.extra_teachers are mixed with the main online teacher, so the job needs teacher_uri")
    uris = [spec.uri for spec in distill.extra_teachers if spec.uri]
    return load_extra_teachers(uris, tokenizer, load=lambda uri: _load_teacher(uri, distill, ds_config, device))


def _zero3_loading(ds_config: dict[str, Any]) -> Any:
    """While the returned object lives, transformers' from_pretrained loads a model straight
    into its ZeRO-3 shards instead of whole on every process (what a 7B student needs)."""
    _import_deepspeed()
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def _needs_teacher_model(job: TrainJob, distill: DistillConfig | None) -> bool:
    """Whether the teacher's weights must be in memory: not when every batch's signal comes from
    stores (unless on-policy batches need scoring), nor for sequence-level KD (CE on its text)."""
    if distill is None:
        return True
    if distill.cross_tokenizer.method == "sequence":
        return False
    return not job.signal_uris or distill.on_policy.fraction > 0


def _teacher_source(
    job: TrainJob, distill: DistillConfig | None, records: list[dict[str, Any]], teacher: Any, teacher_tokenizer: Any,
    tokenizer: Any,
) -> Any:
    """What the objective learns from each batch: the online teacher (or none), or a
    :class:`~mydistill.signal.source.TeacherSource` over stores or the ULD teacher. Stores are
    checked against this run's tokenizer, data and vocabulary here, before any training."""
    if distill is None or not (job.signal_uris or distill.cross_tokenizer.method == "uld"):
        return teacher
    if job.signal_uris:
        from mydistill.signal.teacher import StoreTeacher

        loss = distill.loss
        store = StoreTeacher(
            job.signal_uris, records=records, tokenizer=tokenizer, vocab_size=_student_vocab_size(job, tokenizer),
            weights=loss.teacher_weights, temperature=loss.temperature, divergence=loss.divergence,
        )
        return TeacherSource(teacher=teacher, store=store)
    return TeacherSource(teacher=teacher, uld=ULDTeacher(teacher, teacher_tokenizer, records, distill.max_length))


def _student_vocab_size(job: TrainJob, tokenizer: Any) -> int:
    """The student's output vocabulary, read before the student is loaded (a store is checked first)."""
    if job.init_uri:
        config = io.read_json(io.join(job.init_uri, "config.json"))
        return int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or len(tokenizer))
    return len(tokenizer)  # build_model sizes the vocabulary from the tokenizer


def _load_student(job: TrainJob, cfg: TrainConfig, tokenizer: Any, device: torch.device) -> Any:
    if job.init_uri:
        return load_model(job.init_uri, device=device)
    if job.arch:
        # Built whole on each process from the same seed; deepspeed.initialize then partitions it.
        return build_model(job.arch, tokenizer, seed=cfg.seed).to(device)
    raise ValueError("a training job needs init_uri (a checkpoint) or arch (build from config)")


def _prune_checkpoints(directory: str, keep: int) -> None:
    if not is_main_process():
        return
    tags = sorted(
        (d for d in os.listdir(directory) if d.startswith("step") and os.path.isdir(os.path.join(directory, d))),
        key=lambda d: int(d.removeprefix("step")),
    )
    for tag in tags[:-keep]:
        shutil.rmtree(os.path.join(directory, tag), ignore_errors=True)


def save_checkpoint(
    student: Any, tokenizer: Any, output_uri: str, *, stage: str, inputs: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None, **content: Any,
) -> dict[str, Any]:
    """Write the student as a Hugging Face folder (safetensors + tokenizer), then its manifest.

    The folder is assembled locally and moved (or uploaded) into place before the manifest is
    written, so a reader never takes a half-written checkpoint for a finished one.
    """
    with tempfile.TemporaryDirectory(prefix="mydistill-ckpt-") as tmp:
        student.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = sorted(os.listdir(tmp))
        if io.is_remote(output_uri):
            io.remove(output_uri)
            io.copy_dir(tmp, output_uri)
        else:
            target = output_uri.removeprefix("file://")
            staging = f"{target.rstrip('/')}.tmp-{os.getpid()}"
            shutil.copytree(tmp, staging)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(staging, target)
    return io.write_manifest(output_uri, stage=stage, inputs=inputs, files=files, **content)


def _progress_bar(enabled: bool, label: str, total: int, completed: int = 0):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    progress.start()
    return progress, progress.add_task(label, total=total, completed=completed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one mydistill training job (either stage).")
    parser.add_argument("--job", required=True, help="Path or URI of a TrainJob JSON file.")
    parser.add_argument("--progress", action="store_true", help="Show a progress bar.")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    job = TrainJob(**io.read_json(args.job))
    on_metrics = None
    if job.mlflow_run_id and is_main_process_env():
        from mydistill.tracking import metrics_logger

        on_metrics = metrics_logger(job.mlflow_run_id)
    manifest = run_training(job, on_metrics=on_metrics, progress=args.progress)
    if is_main_process():
        print(f"[mydistill] done: {json.dumps({'output_uri': job.output_uri, 'final': manifest.get('final_metrics', {})})}", flush=True)
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


def is_main_process_env() -> bool:
    """Rank 0 as the launcher announced it, before the process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


if __name__ == "__main__":
    main()


__all__ = ["TrainJob", "TrainingError", "run_training", "save_checkpoint", "batch_indices"]
