"""The teacher and the student: where they are, how they are built or cut, their precision."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mydistill.config.section import ModelDtype, Section


class ModelArch(Section):
    """A Llama-style architecture for a model built from a config (the demo, or a student from scratch)."""

    hidden_size: int = Field(64, gt=0, description="Width of the residual stream.")
    num_hidden_layers: int = Field(2, gt=0, description="Number of transformer blocks.")
    num_attention_heads: int = Field(4, gt=0, description="Attention heads per block.")
    num_key_value_heads: int | None = Field(
        None, gt=0, description="Key/value heads per block (grouped-query attention, as in Llama 3, Qwen, "
        "SmolLM2); empty: one per attention head.",
    )
    intermediate_size: int = Field(256, gt=0, description="Width of the MLP.")
    max_position_embeddings: int = Field(64, gt=0, description="Longest sequence the model accepts.")
    tie_word_embeddings: bool = Field(True, description="Share input embedding and output projection.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelArch:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_key_value_heads and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        return self

    def as_dict(self) -> dict:
        """The architecture for `build_model`; unset options left out (so older fingerprints still hold)."""
        return self.model_dump(exclude_none=True)


class TeacherSpec(Section):
    uri: str | None = Field(
        None,
        description="Teacher model folder (local path or s3://, saved with save_pretrained) or, with "
        "the openai generation backend, the served model name. Left empty with `demo` set: the demo "
        "teacher is used.",
    )
    id: str | None = Field(None, description="A name for the teacher recorded in datasets and MLflow.")
    dtype: ModelDtype = Field(
        "auto",
        description="Precision the frozen teacher is loaded in, wherever it is loaded (generation, the signal stage, "
        "both training stages, evaluation): 'auto' = bfloat16 on a GPU that supports it, else float32. Setting it "
        "also sets generate.dtype and signal.dtype where those are left at 'auto'.",
    )


class StudentInit(Section):
    """A student cut from the teacher: its embeddings, some of its blocks, final norm and head."""

    from_teacher: bool = Field(
        False, description="Start the student from the teacher's own weights (Llama/Qwen/Mistral-style decoders)."
    )
    layers: list[int] | Literal["auto"] | None = Field(
        None,
        description="Teacher blocks to keep, in order (0-based), e.g. [0, 2, 4, 29]; or 'auto': measure each block's "
        "influence on the teacher over the run's own prompts (ShortGPT's Block Influence) and keep the most "
        "influential, as many as num_layers or parameter_fraction allows.",
    )
    keep_every: int | None = Field(
        None, gt=0, description="Keep every k-th teacher block (0, k, 2k, …) plus the last one; instead of `layers`."
    )
    num_layers: int | None = Field(
        None, gt=0, description="With layers: auto, how many teacher blocks the student keeps (or give parameter_fraction)."
    )
    parameter_fraction: float | None = Field(
        None, gt=0, le=1,
        description="With layers: auto, the student's size as a share of the teacher's parameters: as many blocks as "
        "fit, the embeddings and head kept whole (or give num_layers).",
    )
    importance: Literal["block_influence", "skip_kl"] = Field(
        "block_influence",
        description="With layers: auto, how blocks are scored: 'block_influence' (ShortGPT: how much a block turns its "
        "hidden state; one pass) or 'skip_kl' (the KL from the teacher's output to the teacher's with the block "
        "skipped, dropping the cheapest block and scoring the rest again until the size is reached; about "
        "(n − k)(n + k)/4 forward passes for n blocks, k kept).",
    )
    importance_prompts: int = Field(
        64, gt=0, description="With layers: auto, how many prompts of the run's prompt pool the blocks are measured on."
    )
    importance_on: Literal["prompts", "responses"] = Field(
        "prompts",
        description="With layers: auto, what the blocks are measured on: 'prompts' (the first importance_prompts of "
        "the prompt pool, every token) or 'responses' (the first importance_prompts teacher examples of the mix, "
        "prompt and the teacher's response, only at the positions that predict a response token: what answering needs).",
    )

    @model_validator(mode="after")
    def _one_choice_of_layers(self) -> StudentInit:
        if not self.from_teacher:
            if self.layers is not None or self.keep_every is not None:
                raise ValueError("layers / keep_every choose teacher blocks, so they need from_teacher: true")
            # sizes and criteria of a measured cut would be ignored without one: say so rather than train another student
            measuring = [name for name in ("num_layers", "parameter_fraction", "importance", "importance_on")
                         if getattr(self, name) != type(self).model_fields[name].default]
            if measuring:
                raise ValueError(f"{', '.join(measuring)} only apply to a student cut from the teacher by measurement: set "
                                 "from_teacher: true and layers: auto, or leave them out")
            return self
        if (self.layers is None) == (self.keep_every is None):
            raise ValueError("from_teacher: give exactly one of layers (a list of block indices, or auto) or keep_every")
        sized = [name for name in ("num_layers", "parameter_fraction") if getattr(self, name) is not None]
        if self.layers == "auto":
            if len(sized) != 1:
                raise ValueError("layers: auto needs exactly one of num_layers (blocks kept) or parameter_fraction "
                                 f"(share of the teacher's parameters); got {sized or 'neither'}")
            return self
        if self.importance != "block_influence":
            raise ValueError(f"importance: {self.importance} scores blocks for layers: auto; set layers: auto or leave importance out")
        if self.importance_on != "prompts":
            raise ValueError(f"importance_on: {self.importance_on} is where blocks are measured for layers: auto; set layers: auto "
                             "or leave importance_on out")
        if sized:
            raise ValueError(f"{' and '.join(sized)} size a student whose blocks are chosen by measurement: set layers: auto")
        if self.layers is not None:
            if not self.layers:
                raise ValueError("layers: keep at least one block")
            bad = [i for i in self.layers if i < 0]
            if bad:
                raise ValueError(f"layers: block indices start at 0 (got {bad})")
            if sorted(set(self.layers)) != self.layers:
                raise ValueError(f"layers: give distinct indices in increasing order (got {self.layers})")
        return self

    def chosen_layers(self, num_teacher_layers: int) -> list[int]:
        """The teacher blocks kept; raises ValueError for an index past the teacher's last block
        (with layers: auto they are known only once measured: :mod:`mydistill.block_importance`)."""
        if self.layers == "auto":
            raise ValueError("layers: auto chooses the blocks by measuring the teacher; they are in the student-init manifest")
        if self.layers is not None:
            too_big = [i for i in self.layers if i >= num_teacher_layers]
            if too_big:
                raise ValueError(
                    f"student.init.layers {too_big} out of range: the teacher has {num_teacher_layers} blocks "
                    f"(0..{num_teacher_layers - 1})"
                )
            return list(self.layers)
        assert self.keep_every is not None
        kept = list(range(0, num_teacher_layers, self.keep_every))
        return kept if kept[-1] == num_teacher_layers - 1 else [*kept, num_teacher_layers - 1]


class StudentSpec(Section):
    init_uri: str | None = Field(
        None,
        description="Pretrained student folder to start from (local path or s3://). Empty: build the "
        "student from `arch` with the teacher's tokenizer.",
    )
    arch: ModelArch = Field(default_factory=ModelArch, description="Architecture when building from scratch.")
    dtype: ModelDtype = Field(
        "auto",
        description="Precision trained students (and the baseline) are loaded in for evaluation: 'auto' = bfloat16 "
        "on a GPU that supports it, else float32. Training keeps float32 master weights (DeepSpeed's bf16 "
        "section sets the compute precision).",
    )
    init: StudentInit = Field(
        default_factory=StudentInit,
        description="Cut the student from the teacher (from_teacher: true with layers, layers: auto, or keep_every) "
        "instead of building it from `arch`.",
    )

    @model_validator(mode="after")
    def _one_start(self) -> StudentSpec:
        if self.init.from_teacher and self.init_uri:
            raise ValueError("give either init_uri (a pretrained student) or init.from_teacher, not both")
        return self
