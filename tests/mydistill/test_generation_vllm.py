"""The vLLM backend: a real run where vllm and a GPU are present, else only the install hint."""

from __future__ import annotations

import pytest

from mydistill.generation import GenerateConfig, generate_responses, read_responses, vllm_available
from mydistill.generation.vllm import INSTALL_HINT

from tests.mydistill import generation_fixtures as fx


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(vllm_available(), reason="vllm is installed")
def test_choosing_vllm_without_it_says_how_to_install(tmp_path):
    fx.write_prompts(tmp_path / "p.jsonl", ["kite boat"])
    with pytest.raises(ImportError, match="pip install vllm") as err:
        generate_responses(
            str(tmp_path / "p.jsonl"), str(tmp_path / "o"), teacher=str(tmp_path), cfg=GenerateConfig(backend="vllm")
        )
    assert str(err.value) == INSTALL_HINT
    assert not (tmp_path / "o").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not (vllm_available() and _cuda()), reason="needs vllm and a CUDA device")
def test_vllm_matches_the_hf_backend_greedy(tmp_path):
    teacher = fx.build_trained_teacher(tmp_path / "teacher")
    prompts = ["kite boat lamp", "grape", "house iron ? jade"]
    fx.write_prompts(tmp_path / "p.jsonl", prompts)
    cfg = GenerateConfig(backend="vllm", max_new_tokens=16, dtype="float32")
    manifest = generate_responses(
        str(tmp_path / "p.jsonl"), str(tmp_path / "o"), teacher=teacher, cfg=cfg, progress=False
    )
    assert manifest["status_counts"]["ok"] == 3
    for record in read_responses(str(tmp_path / "o")):
        assert record["response"].split() == fx.target_response(record["prompt"]).split()
