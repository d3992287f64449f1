"""Loading, building and checking models and tokenizers."""

from __future__ import annotations

import logging
from typing import Any

import torch

from mydistill.io import DataError, exists, join, localize
from mydistill.tokenization import IGNORE_INDEX, shift_labels

log = logging.getLogger("mydistill")


def load_tokenizer(uri: str) -> Any:
    """The tokenizer saved in a local or ``s3://`` model folder."""
    from transformers import AutoTokenizer

    if not any(exists(join(uri, name)) for name in ("tokenizer_config.json", "tokenizer.json")):
        # checked here: transformers would take the path for a model-hub id and say only that
        raise DataError(f"{uri}: no tokenizer here (tokenizer_config.json / tokenizer.json missing)")
    return AutoTokenizer.from_pretrained(localize(uri))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """A model's load precision: ``auto`` is bf16 on a CUDA device that supports it, else fp32;
    otherwise one of :data:`DTYPES` by name (``teacher.dtype`` / ``student.dtype``)."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        kind = ("cuda" if torch.cuda.is_available() else "cpu") if str(device) == "auto" else torch.device(device).type
        return torch.bfloat16 if kind == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(uri: str, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu") -> Any:
    """A causal LM from a local or ``s3://`` folder saved with ``save_pretrained``, in ``dtype``
    (a torch dtype or a name for :func:`resolve_dtype`; None: fp32)."""
    from transformers import AutoModelForCausalLM

    if not exists(join(uri, "config.json")):
        raise DataError(f"{uri}: no model here (config.json missing)")
    model = AutoModelForCausalLM.from_pretrained(localize(uri), dtype=resolve_dtype(dtype or "float32", device))
    return model.to(device)


def build_model(arch: dict[str, Any], tokenizer: Any, *, seed: int = 0) -> Any:
    """A fresh Llama-style causal LM from an architecture dict (hidden_size, num_hidden_layers, …)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **arch,
    )
    return LlamaForCausalLM(config)


def count_parameters(model: torch.nn.Module) -> int:
    # a ZeRO-3 partitioned parameter holds only this process's share; ds_numel is its full size
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


class VocabularyMismatch(ValueError):
    """Teacher and student tokenizers do not map the same ids to the same strings."""


def check_same_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Raise :class:`VocabularyMismatch` unless both tokenizers have identical vocabularies.

    Logit distillation compares distributions position by position over token ids, so the ids
    must mean the same strings, not only be as many.
    """
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab == s_vocab:
        return
    only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
    only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
    moved = sorted(tok for tok in set(t_vocab) & set(s_vocab) if t_vocab[tok] != s_vocab[tok])[:5]
    raise VocabularyMismatch(
        f"teacher and student vocabularies differ: teacher has {len(t_vocab)} tokens, student "
        f"{len(s_vocab)}; only in teacher: {only_t}; only in student: {only_s}; same token, other "
        f"id: {moved}. Logit distillation needs one tokenizer: build the student with the "
        "teacher's tokenizer."
    )


def cut_student(teacher: Any, layers: list[int]) -> Any:
    """A student made of the teacher's embeddings, the blocks ``layers`` (in that order), its final
    norm and output head: a Llama/Qwen/Mistral-style decoder (``model.layers``) with fewer blocks.

    The new model is built from the teacher's config with ``num_hidden_layers=len(layers)`` and
    loaded from renamed state-dict keys (teacher block ``layers[j]`` → student block ``j``), so every
    block keeps its own ``layer_idx`` for the KV cache. Raises ValueError for another layout or an
    index out of range.
    """
    import copy
    import re

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(teacher.config)
    total = getattr(config, "num_hidden_layers", None)
    if not isinstance(total, int) or not hasattr(getattr(teacher, "model", None), "layers"):
        raise ValueError(
            f"cannot cut a student from a {type(teacher).__name__}: expected a decoder with model.layers and "
            "config.num_hidden_layers (Llama, Qwen, Mistral style)"
        )
    bad = [i for i in layers if not 0 <= i < total]
    if bad or not layers:
        raise ValueError(f"student layers {bad or layers} out of range: the teacher has {total} blocks (0..{total - 1})")
    config.num_hidden_layers = len(layers)
    for per_layer in ("layer_types",):  # per-block settings (sliding vs full attention) follow their block
        values = getattr(config, per_layer, None)
        if isinstance(values, list) and len(values) == total:
            setattr(config, per_layer, [values[i] for i in layers])
    new_index = {old: new for new, old in enumerate(layers)}
    block = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
    state = {}
    for key, value in teacher.state_dict().items():
        match = block.match(key)
        if match is None:
            state[key] = value.clone()  # embeddings, final norm, head
        elif int(match.group(1)) in new_index:
            state[f"model.layers.{new_index[int(match.group(1))]}.{match.group(2)}"] = value.clone()
    student = AutoModelForCausalLM.from_config(config, dtype=next(teacher.parameters()).dtype)
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (getattr(config, "tie_word_embeddings", False) and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"the cut student does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    student.tie_weights()
    return student


def teacher_fingerprint(uri: str) -> str:
    """What identifies a model folder cheaply: its manifest's input hash when it has one, else its
    config and the names and sizes of its files."""
    from mydistill import io

    manifest = io.read_manifest(uri) or {}
    if manifest.get("inputs_sha256"):
        return str(manifest["inputs_sha256"])
    fs, path = io.filesystem(uri)
    files = sorted((entry["name"].rsplit("/", 1)[-1], entry.get("size")) for entry in fs.ls(path, detail=True))
    return io.sha256_of([io.read_json(join(uri, "config.json")), files])


def ensure_cut_student(teacher_uri: str, layers: list[int] | None, keep_every: int | None, output_uri: str) -> dict[str, Any]:
    """Write (once) the student cut from the teacher at ``teacher_uri`` to ``output_uri`` (model + the
    teacher's tokenizer) with a manifest recording the teacher, its fingerprint and the kept blocks."""
    from mydistill import io

    config = io.read_json(join(teacher_uri, "config.json"))
    total = int(config.get("num_hidden_layers", 0))
    if layers is None:
        assert keep_every
        layers = list(range(0, total, keep_every))
        layers = layers if layers[-1] == total - 1 else [*layers, total - 1]
    inputs = {"teacher": teacher_fingerprint(teacher_uri), "layers": layers}
    if io.manifest_matches(output_uri, inputs):
        return io.read_manifest(output_uri) or {}
    return _write_cut(load_model(teacher_uri), teacher_uri, layers, output_uri, inputs)


def ensure_measured_cut(
    teacher_uri: str, prompts: list[str] | None, output_uri: str, *, exchanges: list[tuple[str, str]] | None = None,
    num_layers: int | None = None, parameter_fraction: float | None = None, prompts_sha256: str | None = None,
    importance: str = "block_influence",
) -> dict[str, Any]:
    """``student.init.layers: auto``: score every teacher block over ``prompts`` (``importance``:
    :func:`mydistill.block_importance.block_influence`, ShortGPT, or
    :func:`~mydistill.block_importance.skip_kl_greedy`), keep the ``num_layers`` that score highest
    (or as many as ``parameter_fraction`` of the teacher's parameters allows) and write the cut once,
    measured on ``prompts`` or on ``exchanges`` ((prompt, teacher response) pairs, at the positions that
    predict a response token),
    like :func:`ensure_cut_student`; the manifest adds each block's score (``block_influence`` or
    ``skip_kl``) and how the blocks were chosen."""
    from mydistill import io
    from mydistill.block_importance import block_influence, blocks_for_budget, choose_layers, skip_kl_greedy

    inputs = {
        "teacher": teacher_fingerprint(teacher_uri), "layers": "auto", "num_layers": num_layers,
        "parameter_fraction": parameter_fraction, "prompts": prompts_sha256 or io.sha256_of(prompts if exchanges is None else exchanges),
        **({"importance": importance} if importance != "block_influence" else {}),
        **({"measured_on": "responses"} if exchanges is not None else {}),
    }
    if io.manifest_matches(output_uri, inputs):
        return io.read_manifest(output_uri) or {}
    teacher = load_model(teacher_uri)
    tokenizer = load_tokenizer(teacher_uri)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    from mydistill.tokenization import format_prompt

    # measured on what the teacher sees: each prompt through its chat template (with its response, if given)
    texts = None if exchanges is not None else [format_prompt(tokenizer, p) for p in prompts or []]
    measured = len(exchanges) if exchanges is not None else len(texts or [])
    on = {"measured_on": "responses" if exchanges is not None else "prompts"}
    keep = num_layers if num_layers is not None else blocks_for_budget(teacher, float(parameter_fraction or 1.0))
    total = len(teacher.model.layers)
    if keep > total:
        raise ValueError(f"student.init.num_layers {keep} is more than the teacher's {total} blocks ({teacher_uri})")
    if importance == "skip_kl":
        log.info("student init: scoring %d blocks by skip-KL over %d %s, dropping %d greedily", total, measured, on["measured_on"], total - keep)
        scores, layers = skip_kl_greedy(
            teacher, tokenizer, texts, keep, exchanges=exchanges,
            on_round=lambda block, kl: log.info("student init: dropped block %d (KL %.4f)", block, kl))
        return _write_cut(
            teacher, teacher_uri, layers, output_uri, inputs, skip_kl=scores, chosen_by="skip-KL, greedy: the KL from the "
            "teacher's output to the teacher's with the block skipped (Shortened LLaMA's one-shot criterion, Kim et al. "
            "2024, arXiv:2402.02834, scored against the teacher and applied one block at a time)", measured_on_prompts=measured, **on,
        )
    scores = block_influence(teacher, tokenizer, texts, exchanges=exchanges)
    layers = choose_layers(scores, keep)
    return _write_cut(
        teacher, teacher_uri, layers, output_uri, inputs, block_influence=scores, chosen_by="ShortGPT block influence "
        "(Men et al. 2024, arXiv:2403.03853): the blocks that turn the hidden state most", measured_on_prompts=measured, **on,
    )


def kept_teacher_layers(model_uri: str | None) -> list[int] | None:
    """The teacher blocks a student cut from the teacher kept, in order (its student-init manifest's
    ``teacher_layers``); None for any other model."""
    from mydistill import io

    manifest = io.read_manifest(model_uri) if model_uri else None
    if not manifest or manifest.get("stage") != "student-init":
        return None
    return [int(t) for t in manifest["teacher_layers"]]


def _write_cut(teacher: Any, teacher_uri: str, layers: list[int], output_uri: str, inputs: dict[str, Any], **extra: Any) -> dict[str, Any]:
    from mydistill import io

    student = cut_student(teacher, layers)
    tokenizer = load_tokenizer(teacher_uri)
    import tempfile

    with tempfile.TemporaryDirectory() as local:
        student.save_pretrained(local)
        tokenizer.save_pretrained(local)
        io.copy_dir(local, output_uri)
    # the manifest last: a folder without one is unfinished and made again
    return io.write_manifest(
        output_uri, stage="student-init", inputs=inputs, files=[], from_teacher=teacher_uri, teacher_layers=layers,
        teacher_num_layers=int(teacher.config.num_hidden_layers), parameters=count_parameters(student),
        teacher_parameters=count_parameters(teacher), **extra,
    )


@torch.no_grad()
def response_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at response positions (M, V) and their target tokens (M,)."""
    logits, labels, _ = response_logits_and_starts(model, batch)
    return logits, labels


@torch.no_grad()
def response_logits_and_starts(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`response_logits`, and for each row the index among those M of its first response
    position (B,) (-1 for a row with no response token)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = shift_labels(batch["labels"])
    mask = labels != IGNORE_INDEX
    counts = mask.sum(1)
    starts = torch.cumsum(counts, 0) - counts
    first = torch.where(counts > 0, starts, torch.full_like(starts, -1))
    return logits[mask].float(), labels[mask], first
