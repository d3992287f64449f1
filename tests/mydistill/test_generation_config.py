"""GenerateConfig validation and rationale parsing (no model, no torch)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mydistill.generation import GenerateConfig, apply_template, parse_rationale
from mydistill.config.generation import mask_url


def test_defaults_match_the_contract():
    cfg = GenerateConfig()
    assert (cfg.backend, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.num_samples) == ("hf", 32, 0.0, 1.0, 1)
    assert (cfg.batch_size, cfg.seed, cfg.shard_size, cfg.overlong, cfg.api_key_env) == (
        64,
        0,
        1000,
        "skip",
        "OPENAI_API_KEY",
    )
    assert cfg.max_prompt_tokens is None and cfg.rationale is False


def test_every_field_is_described():
    for name, field in GenerateConfig.model_fields.items():
        assert field.description, name


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("temperature", -0.5, "temperature must be >= 0"),
        ("top_p", 0.0, "top_p must be in (0, 1]"),
        ("top_p", 1.5, "top_p must be in (0, 1]"),
        ("num_samples", 0, "num_samples must be >= 1"),
        ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
        ("batch_size", 0, "batch_size must be >= 1"),
        ("shard_size", -1, "shard_size must be >= 1"),
        ("concurrency", 0, "concurrency must be >= 1"),
        ("max_retries", -1, "max_retries must be >= 0"),
        ("timeout_s", 0, "timeout_s must be > 0"),
        ("max_prompt_tokens", 0, "max_prompt_tokens must be >= 1"),
        ("overlong", "drop", "overlong"),
        ("backend", "tgi", "backend"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_range(field, value, expected):
    with pytest.raises(ValidationError) as err:
        GenerateConfig(**{field: value})
    assert expected in str(err.value)
    assert field in str(err.value)


def test_unknown_field_is_rejected():
    with pytest.raises(ValidationError, match="max_tokens"):
        GenerateConfig(max_tokens=5)


def test_openai_backend_needs_api_base():
    with pytest.raises(ValidationError, match="api_base is required"):
        GenerateConfig(backend="openai")
    cfg = GenerateConfig(backend="openai", api_base="http://127.0.0.1:9/v1/")
    assert cfg.api_base == "http://127.0.0.1:9/v1"


def test_api_key_env_refuses_a_pasted_key():
    with pytest.raises(ValidationError, match="NAME of an environment variable"):
        GenerateConfig(api_key_env="sk-abc123-secret")


def test_rationale_template_and_pattern_are_checked():
    with pytest.raises(ValidationError, match=r"\{prompt\}"):
        GenerateConfig(rationale_template="no placeholder")
    with pytest.raises(ValidationError, match="named groups"):
        GenerateConfig(rationale_pattern=r"(?P<rationale>.*)")
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        GenerateConfig(rationale_pattern=r"(?P<rationale>")


def test_content_params_leave_out_operational_fields():
    a = GenerateConfig(batch_size=8, concurrency=2, device="cpu", shard_size=10).content_params()
    b = GenerateConfig().content_params()
    assert a == b
    assert "rationale_template" not in a
    assert GenerateConfig(rationale=True).content_params()["rationale_template"]
    assert GenerateConfig(temperature=0.7).content_params() != b


def test_public_dict_masks_credentials_in_urls():
    cfg = GenerateConfig(backend="openai", api_base="https://user:hunter2@api.example.com/v1")
    assert "hunter2" not in str(cfg.public_dict())
    assert mask_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


# ----------------------------------------------------------------------------------------------
# rationale mode


def test_template_replaces_only_the_placeholder():
    assert apply_template("f(x) = {x}?", "Q: {prompt} {not_a_field}") == "Q: f(x) = {x}? {not_a_field}"


@pytest.mark.parametrize(
    ("response", "rationale", "answer"),
    [
        ("Rationale: 2 and 2 make 4.\nAnswer: 4", "2 and 2 make 4.", "4"),
        ("rationale : the first word is kite . answer : kite", "the first word is kite .", "kite"),
        ("First add. Then the answer is clear.\nFinal answer: 12", "First add. Then the answer is clear.", "12"),
        # the last "Answer:" wins: a rationale may mention the word
        ("Rationale: answer: is a label. Answer: B", "answer: is a label.", "B"),
    ],
)
def test_parse_rationale(response, rationale, answer):
    parsed = parse_rationale(response)
    assert parsed.ok
    assert (parsed.rationale, parsed.answer) == (rationale, answer)


@pytest.mark.parametrize(
    "response", ["", "just an answer with no label", "Rationale: thinking...", "Answer: 4", "Rationale: x\nAnswer:   "]
)
def test_unparseable_responses_are_not_ok(response):
    assert not parse_rationale(response).ok


def test_custom_pattern():
    pattern = r"(?s)<think>(?P<rationale>.*?)</think>\s*(?P<answer>.+)"
    parsed = parse_rationale("<think>because</think> yes", pattern)
    assert (parsed.rationale, parsed.answer) == ("because", "yes")


_text = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 .,+=()\n", min_size=1, max_size=60).filter(
    lambda s: s.strip() and "answer" not in s
)


@settings(max_examples=200, deadline=None)
@given(rationale=_text, answer=_text.filter(lambda s: "\n" not in s))
def test_parse_round_trips_what_the_template_asks_for(rationale, answer):
    parsed = parse_rationale(f"Rationale: {rationale}\nAnswer: {answer}")
    assert parsed.ok
    assert parsed.rationale == rationale.strip()
    assert parsed.answer == answer.strip()
