"""Teacher generation: prompts -> teacher responses, batched, resumable, on three kinds of backend.

>>> from mydistill.generation import GenerateConfig, generate_responses
>>> manifest = generate_responses("prompts.jsonl", "out/responses", teacher="teacher/", cfg=GenerateConfig())

Heavy dependencies (torch, transformers, vllm, httpx) are imported only when a backend is used.
"""

from mydistill.generation.base import (
    ChatFormatter,
    Completion,
    GenerationRequest,
    PreparedPrompt,
    Sampling,
    TeacherBackend,
)
from mydistill.config.generation import GenerateConfig
from mydistill.generation.hf import HFBackend
from mydistill.generation.openai_api import APIError, OpenAIBackend
from mydistill.generation.rationale import apply_template, parse_rationale
from mydistill.generation.prompts import load_prompts
from mydistill.generation.shards import read_responses
from mydistill.generation.stage import generate_responses, make_backend
from mydistill.generation.vllm import VLLMBackend, vllm_available

__all__ = [
    "APIError",
    "ChatFormatter",
    "Completion",
    "GenerateConfig",
    "GenerationRequest",
    "HFBackend",
    "OpenAIBackend",
    "PreparedPrompt",
    "Sampling",
    "TeacherBackend",
    "VLLMBackend",
    "apply_template",
    "generate_responses",
    "load_prompts",
    "make_backend",
    "parse_rationale",
    "read_responses",
    "vllm_available",
]
