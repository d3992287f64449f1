import pytest

from mydistill.tokenization import IGNORE_INDEX, collate, format_prompt, shift_labels, tokenize_example


def test_labels_cover_exactly_the_response_and_end_of_turn(demo_tokenizer):
    ex = tokenize_example(demo_tokenizer, "reverse: abcd", "dcba", max_length=64)
    assert len(ex.input_ids) == len(ex.labels)
    prompt_len = len(
        demo_tokenizer(format_prompt(demo_tokenizer, "reverse: abcd"), add_special_tokens=False)["input_ids"]
    )
    assert all(label == IGNORE_INDEX for label in ex.labels[:prompt_len])
    target = [t for t in ex.labels if t != IGNORE_INDEX]
    assert demo_tokenizer.decode(target) == "dcba<|end|>"


def test_prompt_uses_the_chat_template(demo_tokenizer):
    assert format_prompt(demo_tokenizer, "sort: cab") == "<|user|>sort: cab<|end|><|assistant|>"


def test_overlong_examples_keep_the_prompt_and_cut_the_response(demo_tokenizer):
    ex = tokenize_example(demo_tokenizer, "reverse: abcd", "x" * 100, max_length=30)
    assert len(ex.input_ids) == 30
    assert sum(label != IGNORE_INDEX for label in ex.labels) == 30 - 16
    with pytest.raises(ValueError, match="leaves no room"):
        tokenize_example(demo_tokenizer, "reverse: " + "a" * 80, "x", max_length=30)


def test_collate_pads_and_masks(demo_tokenizer):
    a = tokenize_example(demo_tokenizer, "reverse: ab", "ba", 64)
    b = tokenize_example(demo_tokenizer, "reverse: abcdef", "fedcba", 64)
    batch = collate([a, b], demo_tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(b.input_ids))
    assert batch["attention_mask"][0].sum() == len(a.input_ids)
    assert (batch["labels"][0, len(a.input_ids) :] == IGNORE_INDEX).all()
    shifted = shift_labels(batch["labels"])
    assert (shifted[:, :-1] == batch["labels"][:, 1:]).all()
    assert (shifted[:, -1] == IGNORE_INDEX).all()


class NoTemplate:
    chat_template = None
    eos_token = "</s>"


def test_without_a_chat_template_the_prompt_ends_with_a_newline():
    assert format_prompt(NoTemplate(), "hi") == "hi\n"


def test_max_length_is_chosen_from_the_data_and_what_does_not_fit_is_counted(demo_tokenizer):
    from mydistill.tokenization import format_prompt, length_report

    records = [{"prompt": "reverse: ab", "response": "ba"}] * 9 + [{"prompt": "reverse: ba", "response": "hgfedcba" * 4}]
    auto = length_report(records, demo_tokenizer, percentile=0.5)
    short = len(demo_tokenizer(format_prompt(demo_tokenizer, "reverse: ab"), add_special_tokens=False)["input_ids"])
    assert auto["chosen_from_data"] and auto["examples"] == 10
    assert auto["max_length"] == auto["tokens_p50"] > short        # the median example fits whole
    assert auto["truncated_responses"] == 1 and auto["dropped_prompts"] == 0  # the long one is cut, not dropped
    everything = length_report(records, demo_tokenizer, percentile=1.0)
    assert everything["max_length"] == everything["tokens_max"] and everything["truncated_responses"] == 0
    assert length_report(records, demo_tokenizer, percentile=1.0, cap=12)["max_length"] == 12
    fixed = length_report(records, demo_tokenizer, max_length=short)
    assert not fixed["chosen_from_data"] and fixed["dropped_prompts"] == 10
