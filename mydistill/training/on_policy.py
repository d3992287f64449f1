"""On-policy distillation: with probability λ a batch's responses come from the student itself.

Generalized Knowledge Distillation (Agarwal et al. 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", arXiv 2306.13649, Algorithm 1): for each batch,
with probability λ (``fraction``) keep the prompts, sample the responses from the *current*
student, let the teacher score every sampled token, and minimise the chosen divergence between
the teacher's and the student's next-token distributions on those tokens; otherwise train on the
fixed data as usual. The student so learns on the sequences it will actually produce, the
train/inference mismatch that makes pure off-policy students drift on long outputs.

On a student-sampled batch the loss is the divergence alone (``alpha = 1``): the sampled tokens
are not labels, and cross-entropy on them would only reinforce the student's own guesses. The
divergence is ``distill.loss.divergence`` unless ``on_policy.divergence`` overrides it (GKD's
paper favours ``generalized_jsd``; TRL's GKDTrainer defaults to β = 0.5).

Sampling uses Hugging Face ``generate`` on the student (``backend: hf``, CPU or GPU) or a vLLM
engine colocated with training (``backend: vllm``, see :class:`VLLMStudentSampler`); both take the
prompts as token ids and return the exact sampled token ids (no decode/re-encode round trip).
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from mydistill import io
from mydistill.config.on_policy import OnPolicyConfig
from mydistill.tokenization import IGNORE_INDEX, TokenizedExample, collate


VLLM_INSTALL_HINT = (
    "distill.on_policy.backend: vllm needs the vllm package (a CUDA build, on the training machine): "
    "pip install vllm; or set distill.on_policy.backend: hf to sample with Hugging Face generate"
)


def prompt_ids_of(batch: dict[str, Tensor]) -> list[list[int]]:
    """Each row's prompt (everything before the first labelled token) from a collated batch."""
    out = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        labelled = (labels != IGNORE_INDEX).nonzero()
        end = int(labelled[0]) if len(labelled) else int(mask.sum())
        out.append(ids[:end].tolist())
    return out


def eos_ids_of(model: Any, tokenizer: Any) -> list[int]:
    from mydistill.generation.base import eos_token_ids

    return eos_token_ids(tokenizer, model.generation_config)


@torch.no_grad()
def sample_from_student(
    student: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    seed: int = 0,
    synced_gpus: bool = False,
) -> list[list[int]]:
    """Sample one response per prompt from ``student``; each is cut after its first eos (kept).

    Prompts are left-padded so that new tokens line up; the student is put in eval mode for the
    generation and back in its previous mode afterwards. ``synced_gpus``: keep stepping until every
    process is done (needed under ZeRO-3, where each forward is a collective).
    """
    from transformers import GenerationConfig

    device = next(student.parameters()).device
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[i, width - len(ids) :] = 1
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        num_beams=1,
        pad_token_id=pad_token_id,
        eos_token_id=list(eos_token_ids) or None,
    )
    was_training = student.training
    student.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = student.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config,
                synced_gpus=synced_gpus,
            )
    finally:
        student.train(was_training)
    return [cut_after_eos(row, eos_token_ids) for row in out[:, width:].tolist()]


def cut_after_eos(token_ids: Sequence[int], eos_token_ids: Sequence[int]) -> list[int]:
    """``token_ids`` up to and including its first eos (what follows is padding or noise)."""
    eos = set(eos_token_ids)
    stop = next((i for i, t in enumerate(token_ids) if t in eos), None)
    return list(token_ids) if stop is None else list(token_ids[: stop + 1])


def import_vllm() -> Any:
    """The vllm module, or an ImportError that says how to install it (or to choose backend 'hf')."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(VLLM_INSTALL_HINT) from e
    return vllm


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def _is_zero3_partitioned(param: Tensor) -> bool:
    # DeepSpeed ZeRO-3 marks the parameters it partitions; their .data is an empty placeholder until gathered
    return hasattr(param, "ds_id")


def _load_weights_in_worker(worker: Any, weights: list[tuple[str, Tensor]]) -> int:
    """Run inside a vLLM worker process (``LLM.collective_rpc``): load ``weights`` into its model."""
    runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
    runner.model.load_weights(weights)
    return len(weights)


class VLLMStudentSampler:
    """A vLLM engine colocated with training that samples from the *current* student.

    Made once per run. The engine is built from the student's config alone (``load_format:
    dummy``: random weights, no checkpoint written) and runs inside this training process
    (``distributed_executor_backend: external_launcher``, each rank its own engine on its own GPU,
    as TRL's colocate mode does), so that before every :meth:`sample` the student's current
    parameters are copied into it in place (under ZeRO-3 each one gathered first, one at a time,
    so no rank ever holds the whole model twice). Prompts go in as token ids; the exact sampled
    ids come back.

    Weight loading uses the engine's in-process model
    (``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights``, vLLM's
    engine when it runs in the calling process) and falls back to ``llm.collective_rpc`` (vLLM ≥
    0.8's call into its worker processes) when the engine keeps its model in another process.
    """

    def __init__(self, cfg: OnPolicyConfig, student: Any, *, eos_token_ids: Sequence[int]) -> None:
        vllm = import_vllm()
        self.cfg = cfg
        self.eos_token_ids = list(eos_token_ids)
        self.weight_syncs = 0
        # the architecture only: the weights come from the student at every sync. vLLM picks its
        # model class by `architectures`, which a config built from scratch (not loaded) lacks
        self._model_dir = tempfile.TemporaryDirectory(prefix=io.temp_prefix("vllm"))
        config = copy.deepcopy(student.config)
        config.architectures = config.architectures or [type(student).__name__]
        config.save_pretrained(self._model_dir.name)
        # external_launcher reads the torch.distributed environment a launcher sets; a lone process gets one of its own
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
        engine = cfg.vllm
        self.llm = vllm.LLM(
            model=self._model_dir.name,
            skip_tokenizer_init=True,
            load_format="dummy",
            distributed_executor_backend="external_launcher",
            gpu_memory_utilization=engine.gpu_memory_utilization,
            dtype=engine.dtype,
            seed=cfg.seed + _rank(),
            **({"max_model_len": engine.max_model_len} if engine.max_model_len else {}),
            **engine.engine_kwargs,
        )

    def push_weights(self, student: Any) -> None:
        """Copy every parameter of ``student`` into the engine (a collective under ZeRO-3: every rank calls it)."""
        params = list(student.named_parameters())
        zero3 = any(_is_zero3_partitioned(p) for _, p in params)
        if zero3:
            import deepspeed
        model = self._in_process_model()
        for name, param in params:
            # one parameter at a time: the gathered copy is freed before the next is gathered
            with deepspeed.zero.GatheredParameters([param]) if zero3 else contextlib.nullcontext():
                if model is not None:
                    model.load_weights([(name, param.data)])
                else:
                    self.llm.collective_rpc(_load_weights_in_worker, args=([(name, param.data.detach().cpu())],))
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights
        self.weight_syncs += 1

    def _in_process_model(self) -> Any:
        try:
            return self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError:
            return None

    @torch.no_grad()
    def sample(self, student: Any, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, seeds: Sequence[int]) -> list[list[int]]:
        """One response per prompt from the student's current weights; each cut after its first eos (kept)."""
        from vllm import SamplingParams

        self.push_weights(student)
        params = [
            SamplingParams(
                n=1, temperature=self.cfg.temperature, top_p=self.cfg.top_p, max_tokens=max_new_tokens,
                stop_token_ids=self.eos_token_ids, seed=seed, detokenize=False,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
        responses = []
        for output in outputs:
            choice = output.outputs[0]
            ids = cut_after_eos(choice.token_ids, self.eos_token_ids)
            # a stop token is part of token_ids in the vLLM versions we know; keep it if one ever leaves it out
            stop = getattr(choice, "stop_reason", None)
            if choice.finish_reason == "stop" and stop in self.eos_token_ids and (not ids or ids[-1] != stop):
                ids.append(stop)
            responses.append(ids)
        return responses


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def student_batch(prompt_ids: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, Tensor]:
    """A collated batch of prompt + sampled response, labels on the response only."""
    examples = [
        TokenizedExample(input_ids=list(p) + list(r), labels=[IGNORE_INDEX] * len(p) + list(r))
        for p, r in zip(prompt_ids, responses, strict=True)
    ]
    return collate(examples, pad_token_id)


class OnPolicyMixer:
    """Decides per step whether the batch is on-policy and builds the student-sampled batch.

    ``draw()`` is True with probability ``cfg.fraction`` (its own seeded generator, so the data
    order of off-policy steps does not depend on λ); ``replace(batch, student, step)`` returns the
    batch with its responses sampled from ``student``; ``objective(obj)`` is ``obj`` with
    ``alpha = 1`` (and the on-policy divergence), sharing its learned modules.
    """

    def __init__(self, cfg: OnPolicyConfig, *, tokenizer: Any, eos_token_ids: Sequence[int]) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_token_ids = list(eos_token_ids)
        self._rng = random.Random(cfg.seed)
        self._objectives: dict[int, Any] = {}
        self.sampled_batches = 0
        self._vllm: VLLMStudentSampler | None = None  # made at the first on-policy batch (it needs the student)
        if cfg.backend == "vllm" and cfg.fraction > 0:
            import_vllm()  # before any training step: a missing package is a setup error, not a step-900 crash

    def draw(self) -> bool:
        return self.cfg.fraction > 0 and self._rng.random() < self.cfg.fraction

    def skip(self, steps: int) -> None:
        """Advance the draws past ``steps`` steps (a resumed run), without sampling anything."""
        for _ in range(steps):
            self.draw()

    def replace(self, batch: dict[str, Tensor], student: Any, step: int, *, synced_gpus: bool = False) -> dict[str, Tensor]:
        """``batch`` with its prompts kept and its responses sampled from ``student`` (labels on them only)."""
        prompts = prompt_ids_of(batch)
        if self.cfg.backend == "vllm":
            from mydistill.generation.base import stable_seed

            if self._vllm is None:
                self._vllm = VLLMStudentSampler(self.cfg, student, eos_token_ids=self.eos_token_ids)
            responses = self._vllm.sample(
                student, prompts, max_new_tokens=self.cfg.max_new_tokens,
                seeds=[stable_seed(self.cfg.seed, step, _rank(), row) for row in range(len(prompts))],
            )
        else:
            responses = sample_from_student(
                student,
                prompts,
                max_new_tokens=self.cfg.max_new_tokens,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                eos_token_ids=self.eos_token_ids,
                pad_token_id=self.pad_token_id,
                seed=self.cfg.seed * 1_000_003 + step,
                synced_gpus=synced_gpus,
            )
        self.sampled_batches += 1
        device = batch["input_ids"].device
        return {k: v.to(device) for k, v in student_batch(prompts, responses, self.pad_token_id).items()}

    @contextlib.contextmanager
    def active(self, objective: Any) -> Iterator[Any]:
        """Within the block ``objective`` (the trainer's own, wrapped by an engine) computes the
        on-policy loss: ``alpha = 1`` and the on-policy divergence; restored afterwards."""
        saved = objective.cfg
        objective.cfg = self.objective(objective).cfg
        try:
            yield objective
        finally:
            objective.cfg = saved

    def objective(self, objective: Any) -> Any:
        """``objective`` with alpha = 1 and the on-policy divergence; its modules (projections) are shared."""
        key = id(objective)
        if key not in self._objectives:
            update: dict[str, Any] = {"alpha": 1.0}
            if self.cfg.divergence is not None:
                update["divergence"] = self.cfg.divergence
            # a shallow copy shares _modules/_parameters, so hidden-state projections stay the trained ones
            on_policy = copy.copy(objective)
            on_policy.cfg = objective.cfg.model_copy(update=update)
            self._objectives[key] = on_policy
        return self._objectives[key]
