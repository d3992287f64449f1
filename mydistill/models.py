"""Loading, building and checking models and tokenizers."""

from __future__ import annotations

from typing import Any

import torch

from mydistill.io import DataError, exists, join, localize


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
