"""A second offline task, of another kind than the QA one: pull one fact out of a sentence.

The answer is in the prompt, so this tests reading, not knowledge: a student that keeps the
teacher's facts but not its reading (or the other way round) shows it. Four categories, by what is
asked, each row ``{"prompt", "answer", "category"}``:

- ``year``: "Sentence: Maria moved to Oslo in 1987 with two friends. Which year is mentioned?" → "1987";
- ``name``: "... Who is the sentence about?" → "Maria";
- ``city``: "... Which city is mentioned?" → "Oslo";
- ``count``: "... How many friends are mentioned?" → "two" (the word the sentence uses).

Sentences are drawn from templates and fillers; the three splits share no sentence, and the eval
set (200 distinct questions by default, 50 per category) uses names and cities that appear in
neither of the others, so a student cannot learn the answers, only how to find them. Scored with
``contains``, like the QA task.

    python -m mydistill.demo.extract_task OUT_DIR [--eval 200] [--real 24] [--prompts 40]   # prompts.jsonl, real.jsonl, eval.jsonl
"""

from __future__ import annotations

import random
from typing import Any

NAMES = [
    "Maria", "Anna", "Peter", "John", "Laura", "David", "Sofia", "Lucas", "Emma", "Daniel", "Clara", "Martin",
    "Julia", "Thomas", "Elena", "Samuel", "Nora", "Oliver", "Alice", "Henry", "Grace", "Victor", "Irene", "Oscar",
    "Helen", "Felix", "Rosa", "Hugo", "Marta", "Simon", "Paula", "Adam", "Lena", "Ivan", "Greta", "Leo",
]
CITIES = [
    "Oslo", "Paris", "Berlin", "Madrid", "Rome", "Vienna", "Lisbon", "Prague", "Dublin", "Warsaw", "Athens",
    "Cairo", "Tokyo", "Lima", "Toronto", "Sydney", "Boston", "Chicago", "Munich", "Milan", "Seattle", "Denver",
    "Naples", "Geneva", "Hamburg", "Zurich", "Porto", "Seville", "Krakow", "Bergen",
]
COUNTS = ["two", "three", "four", "five", "six", "seven", "eight", "nine"]
NOUNS = ["friends", "brothers", "cats", "dogs", "children", "colleagues"]
TEMPLATES = [
    "{name} moved to {city} in {year} with {count} {noun}.",
    "In {year}, {name} visited {city} together with {count} {noun}.",
    "{name} and {count} {noun} opened a small shop in {city} in {year}.",
    "{name} left {city} in {year}, leaving {count} {noun} behind.",
]
QUESTIONS = {
    "year": "Which year is mentioned?",
    "name": "Who is the sentence about?",
    "city": "Which city is mentioned?",
    "count": "How many {noun} are mentioned?",
}


def _row(rng: random.Random, category: str, names: list[str], cities: list[str]) -> dict[str, Any]:
    fill = {"name": rng.choice(names), "city": rng.choice(cities), "year": str(rng.randint(1900, 2020)),
            "count": rng.choice(COUNTS), "noun": rng.choice(NOUNS)}
    sentence = rng.choice(TEMPLATES).format(**fill)
    answer = fill[category]  # a count as the word the sentence uses: extraction, not arithmetic
    question = QUESTIONS[category].format(**fill)
    return {"prompt": f"Sentence: {sentence} {question} Answer in one word.", "answer": answer, "category": category}


def make_extract_splits(num_eval: int = 200, num_real: int = 24, num_prompts: int = 40, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """``eval``, ``real`` (labelled) and ``prompts`` (unlabelled, for the teacher); eval's names and
    cities (a quarter of each list) appear in neither of the others, and no prompt is in two splits."""
    rng = random.Random(seed)
    names, cities = NAMES[:], CITIES[:]
    rng.shuffle(names)
    rng.shuffle(cities)
    held_names, held_cities = names[: len(names) // 4], cities[: len(cities) // 4]
    train_names, train_cities = names[len(names) // 4 :], cities[len(cities) // 4 :]
    categories = list(QUESTIONS)
    seen: set[str] = set()

    def draw(n: int, pick_names: list[str], pick_cities: list[str], *, balanced: bool) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        while len(rows) < n:
            category = categories[len(rows) % len(categories)] if balanced else rng.choice(categories)
            row = _row(rng, category, pick_names, pick_cities)
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                rows.append(row)
        return rows

    eval_rows = draw(num_eval, held_names, held_cities, balanced=True)
    real = draw(num_real, train_names, train_cities, balanced=False)
    prompts = [{"prompt": r["prompt"], "category": r["category"]} for r in draw(num_prompts, train_names, train_cities, balanced=False)]
    return {"eval": eval_rows, "real": real, "prompts": prompts}


def write_extract_data(output_dir: str, **sizes: int) -> dict[str, str]:
    """Write the three splits as JSONL under ``output_dir`` (local or s3://; unchanged files left as they are);
    returns their URIs."""
    from mydistill.demo.splits_cli import write_splits

    return write_splits(output_dir, make_extract_splits(**sizes))


if __name__ == "__main__":
    from mydistill.demo.splits_cli import write_splits_main

    write_splits_main("extract", write_extract_data)
