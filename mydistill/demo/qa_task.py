"""An offline short-answer QA task with free-text answers, for a real pretrained instruct teacher.

Four categories, each row ``{"prompt", "answer", "category"}``:

- ``capital``: "What is the capital of France?" → "Paris";
- ``opposite``: "What is the opposite of hot?" → "cold";
- ``addition``: "What is 3 plus 4?" → "7";
- ``multiplication``: "What is 3 times 4?" → "12" (small factors).

Each question ends with the form of answer wanted ("Reply with the number only.", "Answer in one
short sentence.": ``ANSWER_FORM``).

A teacher answers in sentences ("The capital of France is Paris."), so exact match scores it
near 0 while ``contains`` scores it as a person would. The eval set is drawn from held-out facts
(no capital or opposite in it appears in the training data), so the student has to keep what
the teacher knows, not memorise the real examples. The eval set's 200 distinct questions by default
(57 capitals, 36 opposites, 59 sums, 48 products) are enough for a 95% interval about ±7 points
wide around a 50% score, where the first 24 gave ±20.

    python -m mydistill.demo.qa_task OUT_DIR [--eval 200] [--real 24] [--prompts 40]   # prompts.jsonl, real.jsonl, eval.jsonl
"""

from __future__ import annotations

import random
from typing import Any

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Syria", "Damascus"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
    ("India", "New Delhi"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul"),
    ("Turkey", "Ankara"), ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"), ("Switzerland", "Bern"),
    ("Cuba", "Havana"), ("Colombia", "Bogota"), ("Ukraine", "Kyiv"), ("Czech Republic", "Prague"),
    ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
    ("Lebanon", "Beirut"), ("Jordan", "Amman"), ("Saudi Arabia", "Riyadh"), ("Pakistan", "Islamabad"),
    ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"), ("Indonesia", "Jakarta"), ("the Philippines", "Manila"),
    ("Malaysia", "Kuala Lumpur"), ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"), ("Algeria", "Algiers"),
    ("Tunisia", "Tunis"), ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Iceland", "Reykjavik"),
    ("the United Kingdom", "London"), ("the United States", "Washington"), ("Brazil", "Brasilia"),
    ("Venezuela", "Caracas"), ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"),
]
# more facts, drawn after the lists above (with their own random order), so that a small eval set
# is the one the lists above always gave and a large one has facts left over for training
MORE_CAPITALS = [
    ("Ecuador", "Quito"), ("Uruguay", "Montevideo"), ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"),
    ("Albania", "Tirana"), ("Belarus", "Minsk"), ("Georgia", "Tbilisi"), ("Armenia", "Yerevan"),
    ("Azerbaijan", "Baku"), ("Uzbekistan", "Tashkent"), ("Mongolia", "Ulaanbaatar"), ("Bangladesh", "Dhaka"),
    ("Cambodia", "Phnom Penh"), ("Laos", "Vientiane"), ("New Zealand", "Wellington"), ("Qatar", "Doha"),
    ("Kuwait", "Kuwait City"), ("Oman", "Muscat"), ("Libya", "Tripoli"), ("Sudan", "Khartoum"),
    ("Uganda", "Kampala"), ("Zimbabwe", "Harare"), ("Zambia", "Lusaka"), ("Angola", "Luanda"),
    ("Senegal", "Dakar"), ("Mali", "Bamako"), ("Somalia", "Mogadishu"), ("Rwanda", "Kigali"),
    ("Jamaica", "Kingston"), ("Panama", "Panama City"), ("Honduras", "Tegucigalpa"), ("Nicaragua", "Managua"),
    ("Guatemala", "Guatemala City"), ("Haiti", "Port-au-Prince"), ("Malta", "Valletta"), ("Cyprus", "Nicosia"),
    ("North Korea", "Pyongyang"), ("Bosnia and Herzegovina", "Sarajevo"), ("Montenegro", "Podgorica"),
    ("North Macedonia", "Skopje"), ("Madagascar", "Antananarivo"), ("Namibia", "Windhoek"),
    ("Botswana", "Gaborone"), ("Mozambique", "Maputo"), ("Bahrain", "Manama"), ("Kyrgyzstan", "Bishkek"),
    ("Tajikistan", "Dushanbe"), ("Turkmenistan", "Ashgabat"),
]
MORE_OPPOSITES = [
    ("wide", "narrow"), ("deep", "shallow"), ("sharp", "dull"), ("cheap", "expensive"), ("easy", "difficult"),
    ("always", "never"), ("before", "after"), ("above", "below"), ("sweet", "sour"), ("smooth", "rough"),
    ("male", "female"), ("success", "failure"), ("accept", "reject"), ("increase", "decrease"),
    ("maximum", "minimum"), ("positive", "negative"), ("asleep", "awake"), ("ancient", "modern"),
    ("polite", "rude"), ("import", "export"), ("major", "minor"), ("visible", "invisible"),
    ("possible", "impossible"), ("present", "absent"), ("guilty", "innocent"), ("victory", "defeat"),
    ("tight", "loose"), ("borrow", "lend"), ("floor", "ceiling"), ("war", "peace"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("old", "young"), ("open", "closed"), ("full", "empty"), ("hard", "soft"), ("wet", "dry"),
    ("early", "late"), ("rich", "poor"), ("strong", "weak"), ("high", "low"), ("long", "short"), ("good", "bad"),
    ("left", "right"), ("black", "white"), ("true", "false"), ("win", "lose"), ("love", "hate"),
    ("begin", "end"), ("push", "pull"), ("inside", "outside"), ("heavy", "light"), ("thick", "thin"),
    ("clean", "dirty"), ("loud", "quiet"), ("near", "far"), ("first", "last"), ("buy", "sell"), ("alive", "dead"),
    ("east", "west"), ("north", "south"), ("question", "answer"), ("give", "take"), ("remember", "forget"),
    ("arrive", "leave"), ("entrance", "exit"), ("friend", "enemy"), ("happy", "sad"), ("safe", "dangerous"),
]


ARITHMETIC_PHRASINGS = {
    "addition": ("What is {} plus {}?", "How much is {} plus {}?", "Add {} and {}."),
    "multiplication": ("What is {} times {}?", "How much is {} times {}?", "Multiply {} by {}."),
}


def _arithmetic(rng: random.Random, products: float = 0.5, largest: int = 12) -> dict[str, Any]:
    a, b = rng.randint(2, largest), rng.randint(2, largest)
    if rng.random() < products:
        if largest > 12:  # a times table, extended: one factor at most 12, either way round
            a = rng.randint(2, 12)
            a, b = (a, b) if rng.random() < 0.5 else (b, a)
        return _sum_or_product("multiplication", a, b)
    return _sum_or_product("addition", a, b)


def _sum_or_product(category: str, a: int, b: int, phrasing: int = 0) -> dict[str, Any]:
    answer = a * b if category == "multiplication" else a + b
    # the fact asked, whichever way round: 8 times 7 is the same fact as 7 times 8
    return {"prompt": ARITHMETIC_PHRASINGS[category][phrasing].format(a, b), "answer": str(answer), "category": category,
            "operands": (category, min(a, b), max(a, b)), "pair": (a, b)}


# Every question ends by saying what form of answer is wanted, the same in eval, real and the teacher's
# prompts. Asked bare, SmolLM2-135M-Instruct starts explaining a sum ("To find 7 times 3, we can use
# the") and is cut off by the 12-token answer budget: it answered 18 of the 107 eval sums and products;
# told to reply with the number only, 65 (README). A category the teacher rarely answers cannot be
# judged, and a student distilled from it learns to explain, not to answer.
ANSWER_FORM = {
    "capital": "Answer in one short sentence.",
    "opposite": "Answer in one short sentence.",
    "addition": "Reply with the number only.",
    "multiplication": "Reply with the number only.",
}


def _asking_for_form(row: dict[str, Any], labelled_in_form: bool = False) -> dict[str, Any]:
    """The row asking for its form of answer; a training label (``labelled_in_form``) in that form too."""
    sentence = row.pop("sentence", None)
    row.pop("operands", None)
    row.pop("pair", None)
    row = {**row, "prompt": f"{row['prompt']} {ANSWER_FORM[row['category']]}"}
    if labelled_in_form and sentence:
        row["answer"] = sentence
    return row


# the eval set asks in the first phrasing; the teacher's prompts also ask in the others
CAPITAL_PHRASINGS = ("What is the capital of {}?", "Which city is the capital of {}?", "Name the capital city of {}.")
OPPOSITE_PHRASINGS = ("What is the opposite of {}?", "What word means the opposite of {}?", "Give the opposite of the word {}.")


def _capital(country: str, city: str, phrasing: int = 0) -> dict[str, Any]:
    return {"prompt": CAPITAL_PHRASINGS[phrasing].format(country), "answer": city, "category": "capital",
            "sentence": f"The capital of {country} is {city}."}


def _opposite(word: str, other: str, phrasing: int = 0) -> dict[str, Any]:
    return {"prompt": OPPOSITE_PHRASINGS[phrasing].format(word), "answer": other, "category": "opposite",
            "sentence": f"The opposite of {word} is {other}."}


def make_qa_splits(
    num_eval: int = 200, num_real: int = 24, num_prompts: int = 40, seed: int = 0, prompt_products: float = 0.5,
    prompt_largest: int = 12,
) -> dict[str, list[dict[str, Any]]]:
    """``eval`` (held-out facts, distinct questions), ``real`` (labelled) and ``prompts`` (unlabelled,
    for the teacher): facts split so that eval's capitals and opposites appear in neither of the
    others. A third of the eval set is capitals, a third opposites (at most half of the facts of
    each, so that training keeps the other half), the rest sums and products."""
    rng = random.Random(seed)
    capitals, opposites = CAPITALS[:], list(dict.fromkeys(OPPOSITES))
    rng.shuffle(capitals)
    rng.shuffle(opposites)
    more = random.Random(seed + 1)  # its own order: the draws of `rng` below stay those of a small eval set
    more_capitals, more_opposites = MORE_CAPITALS[:], MORE_OPPOSITES[:]
    more.shuffle(more_capitals)
    more.shuffle(more_opposites)
    capitals += more_capitals
    opposites += [o for o in more_opposites if o not in opposites]
    per = max(num_eval // 3, 1)
    eval_rows = [_capital(*c) for c in capitals[:min(per, len(capitals) // 2)]]
    eval_rows += [_opposite(*o) for o in opposites[:min(per, len(opposites) // 2)]]
    seen = {r["prompt"] for r in eval_rows}
    while len(eval_rows) < num_eval:
        row = _arithmetic(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            eval_rows.append(row)
    capitals_held = {r["prompt"] for r in eval_rows if r["category"] == "capital"}
    opposites_held = {r["prompt"] for r in eval_rows if r["category"] == "opposite"}
    train_facts = [r for r in (_capital(*c) for c in capitals) if r["prompt"] not in capitals_held]
    train_facts += [r for r in (_opposite(*o) for o in opposites) if r["prompt"] not in opposites_held]
    eval_prompts = {r["prompt"] for r in eval_rows}
    eval_operands = {r["operands"] for r in eval_rows if "operands" in r}

    def draw(n: int, distinct: bool = False) -> list[dict[str, Any]]:
        facts = train_facts if not distinct else train_facts + [
            make(*fact, phrasing) for make, held, pool, phrasings in (
                (_capital, capitals_held, capitals, CAPITAL_PHRASINGS), (_opposite, opposites_held, opposites, OPPOSITE_PHRASINGS))
            for fact in pool if make(*fact)["prompt"] not in held for phrasing in range(1, len(phrasings))
        ]
        rows: list[dict[str, Any]] = []
        taken = set(eval_prompts)
        for _ in range(100 * n):  # distinct: as many as there are, when n is more than the facts and sums allow
            if len(rows) == n:
                break
            # the teacher's prompts ask sums and products as often as facts (the eval set asks them more often than not)
            row = rng.choice(facts) if rng.random() < (0.5 if distinct else 0.67) else (
                _arithmetic(rng, prompt_products, prompt_largest) if distinct else _arithmetic(rng))
            if "operands" in row:  # a sum or product the eval set does not ask, in any phrasing or order
                if row["operands"] in eval_operands:
                    continue
                if distinct:
                    row = _sum_or_product(row["category"], *row["pair"], phrasing=rng.randrange(len(ARITHMETIC_PHRASINGS[row["category"]])))
            if row["prompt"] not in taken:
                rows.append(row)
                if distinct:
                    taken.add(row["prompt"])
        return rows

    real = draw(num_real)
    # the teacher's prompts are distinct (a repeated one would be answered again, then dropped by the mix), and ask
    # about the training facts in three phrasings each, and sums and products the eval set does not ask in three too
    prompts = [{"prompt": r["prompt"], "category": r["category"]} for r in draw(num_prompts, distinct=True)]
    return {"eval": [_asking_for_form(dict(r)) for r in eval_rows], "real": [_asking_for_form(dict(r), True) for r in real],
            "prompts": [_asking_for_form(r) for r in prompts]}


def write_qa_data(output_dir: str, **sizes: int) -> dict[str, str]:
    """Write the three splits as JSONL under ``output_dir`` (local or s3://; unchanged files left as they are);
    returns their URIs."""
    from mydistill.demo.splits_cli import write_splits

    return write_splits(output_dir, make_qa_splits(**sizes))


if __name__ == "__main__":
    from mydistill.demo.splits_cli import write_splits_main

    write_splits_main("qa", write_qa_data, options=(
        ("--prompt-products", float, 0.5, "share of the teacher's sums and products that are products"),
        ("--prompt-largest", int, 12, "largest number in the teacher's sums and products (a product's other factor stays at most 12)"),
    ))
