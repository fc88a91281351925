"""A procedurally generated instruction-following dataset for the demo: natural-language instructions over
seven task families, as prompt/output records, deterministic from a seed.

    records = instructions(n=1000, seed=0)

Four families have one correct answer (reverse, sort, arithmetic, count); three have several valid answers
drawn from a fixed distribution per prompt (describe an animal, name an item of a category, list two things
found in a place). For those, a single gold label shows one sample, while a teacher trained on many examples
knows the whole distribution: that is what distillation can hand to a student trained on few labels.
Prompts use a compact form of the Alpaca layout (no preamble sentence: a model trained from scratch in a few
CPU minutes learns to read a 15-token prompt much sooner than a 45-token one):

    ### Instruction: Sort these words alphabetically.
    ### Input: cloud ocean winter
    ### Response:

`output` is a list: the sampled answer first (the training target), then every other valid answer, so that
ROUGE-L's max over references rewards any valid answer at test time.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

_WORDS = ("apple river stone cloud green quick silver orange tiger paper music light ocean forest garden winter "
          "summer candle window bridge").split()
_NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()

# animal -> (adjectives, habitats): each a fixed distribution (weights) over a few valid values
_ANIMALS = {
    "fox": ({"clever": 5, "quick": 3, "quiet": 1}, {"forest": 6, "meadow": 3}),
    "whale": ({"huge": 6, "gentle": 3}, {"ocean": 9}),
    "owl": ({"wise": 5, "quiet": 4, "patient": 1}, {"forest": 5, "barn": 4}),
    "camel": ({"patient": 6, "strong": 3}, {"desert": 9}),
    "otter": ({"playful": 7, "quick": 2}, {"river": 6, "lake": 3}),
    "bear": ({"strong": 5, "huge": 2, "patient": 2}, {"forest": 5, "mountain": 4}),
    "frog": ({"small": 6, "green": 3}, {"pond": 6, "river": 3}),
    "eagle": ({"proud": 5, "sharp": 4}, {"mountain": 7, "cliff": 2}),
}
# category -> items with weights
_CATEGORIES = {
    "fruit": {"apple": 5, "banana": 4, "cherry": 3, "grape": 2, "lemon": 1},
    "color": {"red": 5, "blue": 4, "green": 3, "yellow": 2, "purple": 1},
    "instrument": {"piano": 5, "guitar": 4, "violin": 3, "drum": 2, "flute": 1},
    "vegetable": {"carrot": 5, "potato": 4, "onion": 3, "pepper": 2, "cabbage": 1},
    "tool": {"hammer": 5, "saw": 4, "wrench": 3, "drill": 2, "ladder": 1},
}
_PLACES = {  # where -> things found there
    "kitchen": ["pan", "spoon", "kettle", "plate", "oven"],
    "garden": ["rose", "shovel", "bench", "hose", "tulip"],
    "library": ["book", "desk", "lamp", "map", "shelf"],
    "beach": ["shell", "towel", "umbrella", "crab", "bucket"],
    "classroom": ["chalk", "desk", "globe", "ruler", "clock"],
}


_WHERE = {"kitchen": "in a kitchen", "garden": "in a garden", "library": "in a library", "beach": "on a beach",
          "classroom": "in a classroom"}


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _pick(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _some_words(rng: random.Random) -> list[str]:
    return rng.sample(_WORDS, rng.randint(3, 5))


def _reverse(rng: random.Random) -> tuple[str, str, list[str]]:
    words = _some_words(rng)
    return "Write these words in reverse order.", " ".join(words), [" ".join(reversed(words))]


def _sort(rng: random.Random) -> tuple[str, str, list[str]]:
    words = _some_words(rng)
    return "Sort these words alphabetically.", " ".join(words), [" ".join(sorted(words))]


def _arithmetic(rng: random.Random) -> tuple[str, str, list[str]]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", "", [f"{a} plus {b} is {a + b}."]
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", "", [f"{a} minus {b} is {a - b}."]


def _count(rng: random.Random) -> tuple[str, str, list[str]]:
    words = _some_words(rng)
    return "How many words are in this list?", " ".join(words), [f"There are {_NUMBER_WORDS[len(words)]} words."]


def _describe(rng: random.Random) -> tuple[str, str, list[str]]:
    animal = rng.choice(sorted(_ANIMALS))
    adjectives, habitats = _ANIMALS[animal]
    answer = f"The {animal} is {_pick(rng, adjectives)} and lives in the {_pick(rng, habitats)}."
    valid = [f"The {animal} is {a} and lives in the {h}." for a, h in itertools.product(adjectives, habitats)]
    return f"Describe the {animal} in one sentence.", "", [answer, *[v for v in valid if v != answer]]


def _name_one(rng: random.Random) -> tuple[str, str, list[str]]:
    category = rng.choice(sorted(_CATEGORIES))
    items = _CATEGORIES[category]
    answer = f"One {category} is the {_pick(rng, items)}."
    valid = [f"One {category} is the {item}." for item in items]
    return f"Name {_a(category)}.", "", [answer, *[v for v in valid if v != answer]]


def _two_things(rng: random.Random) -> tuple[str, str, list[str]]:
    place = rng.choice(sorted(_PLACES))
    first, second = rng.sample(_PLACES[place], 2)
    where = _WHERE[place]
    answer = f"{where.capitalize()} you might find {_a(first)} and {_a(second)}."
    valid = [f"{where.capitalize()} you might find {_a(x)} and {_a(y)}."
             for x, y in itertools.permutations(_PLACES[place], 2)]
    return f"List two things you might find {where}.", "", [answer, *[v for v in valid if v != answer]]


_MARKERS = {"reverse": "reverse order", "sort": "alphabetically", "arithmetic": "What is", "count": "How many words",
            "describe": "Describe the", "name_one": "### Instruction: Name ", "two_things": "List two things"}
MULTI_ANSWER = ("describe", "name_one", "two_things")
"""The families with several valid answers."""


def family_of(prompt: str) -> str:
    """The task family a generated prompt belongs to."""
    for family, marker in _MARKERS.items():
        if marker in prompt:
            return family
    raise ValueError(f"not a prompt of data/instructions.py: {prompt[:60]!r}")


FAMILIES = {"reverse": _reverse, "sort": _sort, "arithmetic": _arithmetic, "count": _count,
            "describe": _describe, "name_one": _name_one, "two_things": _two_things}


def render_prompt(instruction: str, input_text: str = "") -> str:
    lines = [f"### Instruction: {instruction}"] + ([f"### Input: {input_text}"] if input_text else [])
    return "\n".join(lines) + "\n### Response:\n"


def instructions(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` prompt/output records from all families in equal shares, fully determined by `seed`."""
    rng = random.Random(seed)
    makers = list(FAMILIES.values())
    records = []
    for _ in range(n):
        instruction, input_text, outputs = rng.choice(makers)(rng)
        records.append({"prompt": render_prompt(instruction, input_text), "output": outputs})
    return records
