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
    from mydistill.demo.qa_task import ANSWER_FORM, CAPITAL_PHRASINGS, OPPOSITE_PHRASINGS

    splits = make_qa_splits(num_prompts=num_prompts)
    form = re.escape(" " + ANSWER_FORM["capital"])
    subjects = [re.compile(re.escape(p).replace(re.escape("{}"), "(.+)") + form + "$") for p in CAPITAL_PHRASINGS + OPPOSITE_PHRASINGS]

    def subject(prompt: str) -> str | None:
        return next((m.group(1) for pattern in subjects if (m := pattern.match(prompt))), None)

    held = {s for r in splits["eval"] if (s := subject(r["prompt"]))}
    trained = {s for r in splits["real"] + splits["prompts"] if (s := subject(r["prompt"]))}
    assert len(held) == 57 + 36 and trained and not held & trained
    prompts = [r["prompt"] for r in splits["prompts"]]
    assert len(prompts) == len(set(prompts)) == num_prompts  # distinct: each asks the teacher something new
    assert {subject(p) is not None and not p.startswith("What is the") for p in prompts} == {True, False}  # other phrasings too

    def fact(prompt: str) -> tuple[str, int, int] | None:  # a sum or product, whichever way round and however asked
        numbers = [int(n) for n in re.findall(r"\d+", prompt)]
        operation = "times" if ("times" in prompt or "Multiply" in prompt) else "plus" if ("plus" in prompt or "Add" in prompt) else None
        return (operation, min(numbers), max(numbers)) if operation and len(numbers) == 2 else None

    held_sums = {f for r in splits["eval"] if (f := fact(r["prompt"]))}
    trained_sums = [f for r in splits["real"] + splits["prompts"] if (f := fact(r["prompt"]))]
    assert len(held_sums) > 60 and trained_sums and not held_sums & set(trained_sums)
    assert {p.split()[0] for p in prompts if fact(p)} == {"What", "How", "Add", "Multiply"}


def test_extraction_answers_are_read_from_the_sentence_and_its_names_are_held_out():
    splits = make_extract_splits()
    for row in splits["eval"]:
        sentence = row["prompt"].split("Sentence: ", 1)[1]
        assert row["answer"] in sentence
        if row["category"] == "count":
            assert row["answer"] in COUNTS
    eval_names = {r["answer"] for r in splits["eval"] if r["category"] == "name"}
    assert eval_names and not any(name in r["prompt"] for name in eval_names for r in splits["real"] + splits["prompts"])


def test_every_qa_question_says_the_form_of_answer_wanted_the_same_in_training_and_eval():
    from mydistill.demo.qa_task import ANSWER_FORM

    splits = make_qa_splits(num_prompts=200)
    for name, rows in splits.items():
        for row in rows:
            assert row["prompt"].endswith(" " + ANSWER_FORM[row["category"]]), (name, row)
    sums = [r for r in splits["eval"] if r["category"] in ("addition", "multiplication")]
    assert sums and all(r["prompt"].endswith("Reply with the number only.") for r in sums)
    real = {r["category"]: r["answer"] for r in splits["real"]}  # the real answers are in that form too
    assert real["capital"].startswith("The capital of ") and real["capital"].endswith(".") and real["addition"].isdigit()
    assert all(not r["answer"].startswith("The ") for r in splits["eval"])  # eval's references stay the bare answer


def test_writing_the_same_splits_again_leaves_the_files_untouched_and_a_changed_one_is_replaced(tmp_path):
    """Runs are keyed by their inputs' size and time stamp: the example script writes the data before every run,
    so an unchanged file must keep its stamp (and a stale one from an older version of the task must go)."""
    import os

    from mydistill import io
    from mydistill.demo.qa_task import write_qa_data

    uris = write_qa_data(str(tmp_path), num_eval=8, num_real=4, num_prompts=6)
    os.utime(uris["eval"], ns=(1, 1))
    stale = io.read_records(uris["prompts"])[:-1]
    io.write_records(uris["prompts"], stale)
    again = write_qa_data(str(tmp_path), num_eval=8, num_real=4, num_prompts=6)
    assert again == uris
    assert os.stat(uris["eval"]).st_mtime_ns == 1  # untouched
    assert len(io.read_records(uris["prompts"])) == 6  # rewritten


def test_the_teachers_sums_and_products_can_reach_past_the_eval_sets_numbers_and_lean_to_products():
    """--prompt-largest / --prompt-products change the teacher's prompts only: eval and the real examples stay as
    they were, a product keeps one factor of the times table, and no eval sum or product is asked in any order."""
    base, wide = make_qa_splits(num_prompts=400), make_qa_splits(num_prompts=400, prompt_largest=19, prompt_products=0.6)
    assert wide["eval"] == base["eval"] and wide["real"] == base["real"]

    def operands(row):
        return [int(n) for n in re.findall(r"\d+", row["prompt"])]

    asked = {(r["category"], *sorted(operands(r))) for r in base["eval"] if r["category"] in ("addition", "multiplication")}
    arithmetic = [r for r in wide["prompts"] if r["category"] in ("addition", "multiplication")]
    assert max(max(operands(r)) for r in arithmetic) > 12 and max(max(operands(r)) for r in arithmetic) <= 19
    assert all(min(operands(r)) <= 12 for r in arithmetic if r["category"] == "multiplication")
    assert not {(r["category"], *sorted(operands(r))) for r in arithmetic} & asked
    products = [sum(r["category"] == "multiplication" for r in rows["prompts"]) for rows in (base, wide)]
    assert products[1] > products[0]
    assert len(arithmetic) > sum(r["category"] in ("addition", "multiplication") for r in base["prompts"])
