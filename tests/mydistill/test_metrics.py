"""Answer metrics against values worked out by hand."""

import re

import pytest

from mydistill.evaluation import metrics as M


@pytest.mark.parametrize(("answer", "reference", "score"), [
    ("Paris", "paris", 1.0),
    ("  Paris. ", "Paris", 1.0),
    ("'Paris!'", "Paris", 1.0),
    ("The capital is Paris.", "Paris", 0.0),
    ("12", "12", 1.0),
])
def test_exact_normalises_case_whitespace_and_trailing_punctuation(answer, reference, score):
    assert M.exact(answer, reference) == score


@pytest.mark.parametrize(("answer", "reference", "score"), [
    ("The capital of Syria is Damascus.", "Damascus", 1.0),
    ("the opposite of hot is cold", "Cold", 1.0),
    ("Coldness is the opposite", "cold", 0.0),     # inside a longer word
    ("7 + 5 is 12.", "12", 1.0),
    ("The answer is 120.", "12", 0.0),             # inside a longer number
    ("It is 1.12 metres", "12", 0.0),
    ("New York City", "new york", 1.0),
    ("anything", "", 0.0),
])
def test_contains_finds_the_reference_as_a_whole_word_or_number(answer, reference, score):
    assert M.contains(answer, reference) == score


def test_extract_by_preset_and_by_regex():
    assert M.extract("7 plus 5 is 12, so 12.", "12", "last_number") == 1.0
    assert M.extract("3 times 4 is 13", "12", "last_number") == 0.0
    assert M.extract("no number here", "12", "last_number") == 0.0
    assert M.extract("Let me think. Answer: Paris", "Paris", "after_answer") == 1.0
    assert M.extract("The answer is Paris.", "Paris", "after_answer") == 1.0
    assert M.extract("city=<Rome>", "rome", r"<(\w+)>") == 1.0   # group 1
    assert M.extract("Rome!", "rome", r"\w+") == 1.0              # whole match
    with pytest.raises(re.error):
        M.compile_extract("(unclosed")


def test_rouge_l_is_the_lcs_f1_over_words():
    # reference "the cat sat" (3), answer "the cat was here" (4): LCS "the cat" = 2
    # P = 2/4, R = 2/3, F1 = 2PR/(P+R) = 4/7
    assert M.rouge_l("the cat was here", "the cat sat") == pytest.approx(4 / 7)
    assert M.rouge_l("Paris", "Paris") == pytest.approx(1.0)
    assert M.rouge_l("Rome", "Paris") == 0.0


def test_chrf_is_on_a_zero_to_one_scale():
    assert M.chrf("Damascus", "Damascus") == pytest.approx(1.0)
    assert M.chrf("xyz", "Damascus") == pytest.approx(0.0)
    assert 0.0 < M.chrf("Damascu", "Damascus") < 1.0


def test_score_answers_per_example_and_report_keys():
    scores = M.score_answers(["exact", "contains"], ["Paris.", "It is Rome"], ["paris", "Paris"])
    assert scores == {"exact": [1.0, 0.0], "contains": [1.0, 0.0]}
    assert M.report_key("exact") == "exact_match" and M.report_key("contains") == "contains"
    with pytest.raises(ValueError, match="unknown text metric 'bleu'"):
        M.text_metric("bleu")


def test_expected_calibration_error_by_hand():
    # bin (0.8, 0.9]: confidences 0.9, 0.9, accuracy 1/2 -> |0.5 - 0.9| = 0.4, weight 2/4
    # bin (0.5, 0.6]: confidences 0.6, 0.6, accuracy 2/2 -> |1 - 0.6| = 0.4, weight 2/4
    assert M.expected_calibration_error([0.9, 0.9, 0.6, 0.6], [True, False, True, True]) == pytest.approx(0.4)
    assert M.expected_calibration_error([1.0, 1.0], [True, True]) == pytest.approx(0.0)
    assert M.expected_calibration_error([], []) == 0.0
