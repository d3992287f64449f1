"""The example tasks' data (mydistill.demo.qa_task, mydistill.demo.extract_task): eval sets big enough
to decide (200 distinct held-out questions in 4 categories), nothing of eval's in training."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from mydistill.demo.extract_task import COUNTS, make_extract_splits
from mydistill.demo.qa_task import make_qa_splits


@pytest.mark.parametrize("make", [make_qa_splits, make_extract_splits])
def test_the_eval_set_has_200_distinct_questions_in_4_categories_none_seen_in_training(make):
    splits = make()
    questions = [r["prompt"] for r in splits["eval"]]
    assert len(questions) == len(set(questions)) == 200
    counts = Counter(r["category"] for r in splits["eval"])
    assert len(counts) == 4 and min(counts.values()) >= 30, counts
    training = {r["prompt"] for r in splits["real"] + splits["prompts"]}
    assert not training & set(questions)
    assert make() == splits  # deterministic: written offline, the same on every machine


@pytest.mark.parametrize("num_prompts", [40, 400])
def test_qa_eval_facts_are_held_out_from_training_in_every_phrasing(num_prompts):
    from mydistill.demo.qa_task import CAPITAL_PHRASINGS, OPPOSITE_PHRASINGS

    splits = make_qa_splits(num_prompts=num_prompts)
    subjects = [re.compile(re.escape(p).replace(re.escape("{}"), "(.+)") + "$") for p in CAPITAL_PHRASINGS + OPPOSITE_PHRASINGS]

    def subject(prompt: str) -> str | None:
        return next((m.group(1) for pattern in subjects if (m := pattern.match(prompt))), None)

    held = {s for r in splits["eval"] if (s := subject(r["prompt"]))}
    trained = {s for r in splits["real"] + splits["prompts"] if (s := subject(r["prompt"]))}
    assert len(held) == 57 + 36 and trained and not held & trained
    prompts = [r["prompt"] for r in splits["prompts"]]
    assert len(prompts) == len(set(prompts)) == num_prompts  # distinct: each asks the teacher something new
    assert {subject(p) is not None and not p.startswith("What is the") for p in prompts} == {True, False}  # other phrasings too


def test_extraction_answers_are_read_from_the_sentence_and_its_names_are_held_out():
    splits = make_extract_splits()
    for row in splits["eval"]:
        sentence = row["prompt"].split("Sentence: ", 1)[1]
        assert row["answer"] in sentence
        if row["category"] == "count":
            assert row["answer"] in COUNTS
    eval_names = {r["answer"] for r in splits["eval"] if r["category"] == "name"}
    assert eval_names and not any(name in r["prompt"] for name in eval_names for r in splits["real"] + splits["prompts"])
