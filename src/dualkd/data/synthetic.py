"""Small generated tasks (prompt/output records) for smoke tests and the demo: no files, no network.

    repeat: tiger stone cloud\n   ->  tiger stone cloud          (task "copy")
    reverse: tiger stone cloud\n  ->  cloud stone tiger          (task "copy")
    sort: tiger stone cloud\n     ->  cloud stone tiger          (task "sort")
    add: 7 5\n                    ->  12                         (task "arithmetic", also "sub")
    color of tiger:\n            ->  amber                      (task "associate": sampled, see below)

`associate` answers are *sampled* from a fixed distribution per word (the same for every seed): a model
can only learn the distribution, and a teacher that has learned it passes it on through its soft targets.
That is the setting where distillation shows its worth with little data (Hinton et al.'s "dark knowledge").

`instructions` (data/instructions.py) is the demo's natural-language instruction set in Alpaca form.

Prompts are short on purpose, so that most computed tokens carry loss: a 1M-parameter model learns the
copy tasks in a few hundred CPU steps, while a 4x smaller one lags behind, which is what the demo shows.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from dualkd.data.instructions import instructions

_WORDS = (
    "apple river stone cloud green quick silver orange tiger paper "
    "music light ocean forest garden winter summer candle window bridge"
).split()


def _words(rng: random.Random) -> list[str]:
    return [rng.choice(_WORDS) for _ in range(rng.randint(2, 6))]


def _copy(rng: random.Random) -> dict[str, Any]:
    words = _words(rng)
    if rng.random() < 0.5:
        return {"prompt": f"repeat: {' '.join(words)}\n", "output": " ".join(words)}
    return {"prompt": f"reverse: {' '.join(words)}\n", "output": " ".join(reversed(words))}


def _sort(rng: random.Random) -> dict[str, Any]:
    words = _words(rng)
    return {"prompt": f"sort: {' '.join(words)}\n", "output": " ".join(sorted(words))}


_COLORS = "amber blue crimson gray ivory jade olive violet".split()
# one fixed categorical distribution over colors per word, shared by all seeds (a Dirichlet(0.5) draw)
_world = random.Random(1234)
_ASSOCIATION = {}
for _w in _WORDS:
    _g = [_world.gammavariate(0.5, 1.0) for _ in _COLORS]
    _ASSOCIATION[_w] = [g / sum(_g) for g in _g]


def _associate(rng: random.Random) -> dict[str, Any]:
    word = rng.choice(_WORDS)
    color = rng.choices(_COLORS, weights=_ASSOCIATION[word])[0]
    return {"prompt": f"color of {word}:\n", "output": color}


def _arithmetic(rng: random.Random) -> dict[str, Any]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return {"prompt": f"add: {a} {b}\n", "output": str(a + b)}
    a, b = max(a, b), min(a, b)
    return {"prompt": f"sub: {a} {b}\n", "output": str(a - b)}


_TASKS: dict[str, tuple[Callable[[random.Random], dict[str, Any]], ...]] = {
    "copy": (_copy,),
    "sort": (_sort,),
    "arithmetic": (_arithmetic,),
    "associate": (_associate,),
    "mixed": (_copy, _sort, _arithmetic, _associate),
}
TASKS = (*_TASKS, "instructions")


def generate(task: str, n: int, seed: int) -> list[dict[str, Any]]:
    """`n` records of `task`, fully determined by `seed` (`instructions`: Alpaca records, see instructions.py)."""
    if task == "instructions":
        return instructions(n, seed)
    if task not in _TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {sorted(TASKS)}")
    rng = random.Random(seed)
    makers = _TASKS[task]
    return [rng.choice(makers)(rng) for _ in range(n)]
