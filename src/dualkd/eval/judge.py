"""Pairwise LLM-as-judge: the win rate of one model's responses against a baseline's, judged by any
OpenAI-compatible chat endpoint (a vLLM server, an API).

    dualkd judge runs/ad/eval/generations/dolly.seed10.jsonl runs/dpo/eval/generations/dolly.seed10.jsonl \\
        --endpoint http://127.0.0.1:8000/v1 --model Qwen2.5-72B-Instruct --max-requests 2000

Each prompt is judged twice, with the candidate first and then second, so that the judge's preference for a
position cancels out; a response wins a prompt with two votes, ties with one (or with two "tie" answers).
The win rate counts a tie as half a win. Requests are retried with exponential backoff on timeouts, 429 and
5xx; answers are cached on disk by request content (rerunning costs nothing; an interrupted run continues);
`--max-requests` caps the requests sent over the network, and the run stops with a partial result when it
is spent.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dualkd.errors import DataError, DualKDError

SYSTEM = "You are a careful, impartial judge of answers to user instructions."
TEMPLATE = """Compare two responses to the instruction below. Judge helpfulness, correctness and faithfulness to
the instruction; ignore the order of presentation and do not prefer a response for being longer.

[Instruction]
{prompt}

[Response A]
{a}

[Response B]
{b}

Which response is better? Reply with exactly one word: A, B, or tie."""
_VERDICT = re.compile(r"\b(A|B|tie)\b", re.IGNORECASE)


class JudgeError(DualKDError):
    """The endpoint refused or kept failing."""


class BudgetSpent(DualKDError):
    """`max_requests` requests were sent."""


@dataclass
class JudgeClient:
    endpoint: str
    model: str
    api_key: str | None = None
    cache_path: Path | None = None
    max_requests: int | None = None
    retries: int = 4
    timeout: float = 60.0
    backoff: float = 0.5
    requests_sent: int = 0
    cache_hits: int = 0
    _cache: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cache_path is not None and self.cache_path.exists():
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    self._cache[row["key"]] = row["answer"]

    def ask(self, prompt: str) -> str:
        body = {"model": self.model, "temperature": 0.0, "max_tokens": 8,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]}
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        if key in self._cache:
            self.cache_hits += 1
            return self._cache[key]
        if self.max_requests is not None and self.requests_sent >= self.max_requests:
            raise BudgetSpent(f"--max-requests {self.max_requests} reached")
        answer = self._post(body)
        self._cache[key] = answer
        if self.cache_path is not None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with self.cache_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "answer": answer}) + "\n")
        return answer

    def _post(self, body: dict[str, Any]) -> str:
        url = self.endpoint.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            self.requests_sent += 1
            request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    data = json.loads(response.read().decode())
                return str(data["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read().decode(errors='replace')[:200]}"
                if e.code != 429 and e.code < 500:
                    raise JudgeError(f"{url}: {last}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (KeyError, IndexError, json.JSONDecodeError) as e:
                raise JudgeError(f"{url}: not an OpenAI-style chat completion ({type(e).__name__}: {e})") from None
            if attempt < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        raise JudgeError(f"{url}: gave up after {self.retries + 1} attempts; last error: {last}")


def parse_verdict(answer: str) -> str:
    """'A', 'B' or 'tie' from the judge's reply (the first such word); 'tie' when there is none."""
    m = _VERDICT.search(answer)
    return "tie" if m is None else ("tie" if m.group(1).lower() == "tie" else m.group(1).upper())


def read_generations(path: str | Path) -> list[dict[str, Any]]:
    """Rows with `prompt` and `generation` (dualkd eval) or `output` (dualkd generate)."""
    rows = []
    for k, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        text = row.get("generation", row.get("output"))
        if not isinstance(row.get("prompt"), str) or not isinstance(text, str):
            raise DataError(f"{path}:{k}: expected `prompt` and `generation` (or `output`) strings")
        rows.append({"prompt": row["prompt"], "response": text})
    return rows


def judge_pairwise(candidate: list[dict[str, Any]], baseline: list[dict[str, Any]], client: JudgeClient,
                   both_orders: bool = True, progress: Any = None) -> dict[str, Any]:
    """Win rate of `candidate` over `baseline`, matched by prompt (in the candidate's order)."""
    by_prompt = {row["prompt"]: row["response"] for row in baseline}
    missing = [row["prompt"] for row in candidate if row["prompt"] not in by_prompt]
    if missing:
        raise DataError(f"{len(missing)} candidate prompt(s) have no baseline response, e.g. {missing[0][:80]!r}")
    items, stopped = [], None
    for row in candidate:
        prompt, mine, theirs = row["prompt"], row["response"], by_prompt[row["prompt"]]
        try:
            first = parse_verdict(client.ask(TEMPLATE.format(prompt=prompt, a=mine, b=theirs)))
            votes = [{"A": 1.0, "B": 0.0, "tie": 0.5}[first]]
            if both_orders:
                second = parse_verdict(client.ask(TEMPLATE.format(prompt=prompt, a=theirs, b=mine)))
                votes.append({"A": 0.0, "B": 1.0, "tie": 0.5}[second])
        except BudgetSpent as e:
            stopped = str(e)
            break
        items.append({"prompt": prompt, "score": sum(votes) / len(votes), "votes": votes})
        if progress is not None:
            progress()
    scores = [it["score"] for it in items]
    return {
        "judged": len(items), "of": len(candidate),
        "win_rate": 100.0 * sum(scores) / len(scores) if scores else None,
        "wins": sum(s > 0.5 for s in scores), "ties": sum(s == 0.5 for s in scores),
        "losses": sum(s < 0.5 for s in scores), "requests_sent": client.requests_sent,
        "cache_hits": client.cache_hits, "stopped": stopped, "items": items,
    }


def api_key_from_env(name: str | None) -> str | None:
    return os.environ.get(name) if name else None
