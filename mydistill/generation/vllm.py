"""Teacher generation with vLLM (GPU machines; optional dependency, imported only when chosen).

vLLM schedules all prompts of a shard at once (continuous batching, paged KV cache), so there is
no batch size to tune. Prompts are passed as token ids, formatted and counted with the same
tokenizer code as the hf backend, so both backends see exactly the same inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from mydistill.generation.base import (
    ChatFormatter,
    Completion,
    GenerationRequest,
    ProgressCallback,
    Sampling,
    TeacherBackend,
    stable_seed,
)

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "the vllm backend needs the vllm package on a CUDA machine: pip install vllm "
    "(or choose backend='hf', or backend='openai' against a running vLLM server)"
)


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class VLLMBackend(TeacherBackend):
    name = "vllm"

    def __init__(
        self,
        teacher: str,
        *,
        dtype: str = "auto",
        seed: int = 0,
        tokenizer: Any = None,
        **llm_kwargs: Any,
    ):
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError(INSTALL_HINT) from e
        from mydistill.io import localize

        path = localize(teacher)
        self.teacher = teacher
        # vLLM names dtypes like torch ("bfloat16", "float16", "float32") and also accepts "auto".
        self.llm = LLM(model=path, tokenizer=path, dtype=dtype, seed=seed, **llm_kwargs)
        self.tokenizer = tokenizer if tokenizer is not None else self.llm.get_tokenizer()
        self.formatter = ChatFormatter(self.tokenizer)

    def context_window(self, max_new_tokens: int) -> int | None:
        return int(self.llm.llm_engine.model_config.max_model_len) - max_new_tokens

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: Sampling,
        on_progress: ProgressCallback | None = None,
    ) -> list[list[Completion]]:
        from vllm import SamplingParams

        prompts = []
        params = []
        for request in requests:
            if request.prompt.token_ids is None:
                raise ValueError(f"prompt {request.prompt.key!r} was not tokenized (use VLLMBackend.prepare)")
            prompts.append({"prompt_token_ids": list(request.prompt.token_ids)})
            params.append(
                SamplingParams(
                    n=len(request.sample_indices),
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    max_tokens=sampling.max_new_tokens,
                    ignore_eos=sampling.ignore_eos,
                    skip_special_tokens=True,
                    # Per-request seed: results do not depend on how vLLM batches the shard.
                    seed=stable_seed(sampling.seed, request.prompt.key, *request.sample_indices),
                )
            )
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results: list[list[Completion]] = []
        for request, output in zip(requests, outputs, strict=True):
            per_request = []
            for choice in output.outputs:
                finish = choice.finish_reason
                per_request.append(
                    Completion(
                        text=choice.text,
                        finish_reason="length" if finish == "length" else ("stop" if finish == "stop" else "error"),
                        prompt_tokens=len(output.prompt_token_ids or request.prompt.token_ids or []),
                        completion_tokens=len(choice.token_ids),
                        error=None if finish in ("stop", "length") else f"finish_reason={finish}",
                    )
                )
            results.append(per_request)
        if on_progress:
            on_progress(sum(len(r) for r in results))
        return results
