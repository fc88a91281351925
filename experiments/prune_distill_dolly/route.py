"""Route each example to the teacher that predicts its response better: the data of the `both-route` row.

    python experiments/prune_distill_dolly/route.py runs/pdd/cache-a runs/pdd/cache-b \
        --split train data/dolly/train.jsonl runs/pdd/train-routed.jsonl \
        --split dev data/dolly/dev.jsonl runs/pdd/dev-routed.jsonl

For every example a cache holds (the run's first examples of that file, in order), the response's total
negative log-likelihood under each teacher, computed from the cache's hidden states and LM head (the gold
tokens of that teacher's own tokenization, EOS included): both teachers read the same response text, so the
lower total is the better prediction of the same bytes whatever the tokenizers. The file's records are copied
with `"teacher": "a"` or `"b"` added (the name of the lower); the counts and the mean bits per byte of each
teacher are printed and written beside the output (`<out>.json`). Only training and dev responses are read,
never the test prompts.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from dualkd.config import load_config
from dualkd.data.config import DataSource
from dualkd.data.dataset import TruncationRules, tokenize_examples
from dualkd.data.readers import load_examples
from dualkd.teachers import cache_tokenizer
from dualkd.teachers.cache_files import TeacherCache

CONFIG = "configs/prune-distill-dolly.yaml"
ROWS_PER_PASS = 256  # logits of [rows, V] at a time (Gemma's V = 262,144: 256 MiB in fp32)


def response_nats(cache: Path, split: str, path: Path, rules: TruncationRules) -> list[float]:
    """Each cached example's response NLL (nats) under the cache's teacher."""
    reader = TeacherCache(cache / split)
    n = int(reader.manifest["examples"])
    examples = load_examples(DataSource(path=str(path)), "auto", "raise", n)[0]
    tokenized = tokenize_examples(examples, cache_tokenizer(cache), rules)
    weight, bias = reader.head()
    weight = weight.float()
    bias = bias.float() if bias is not None else None
    nats = []
    for i, item in enumerate(tokenized):
        labels = torch.tensor(item.ids[item.prompt_len:])  # the response tokens and EOS, in mask order
        hidden = reader.hidden([i]).float()
        assert hidden.shape[0] == labels.numel(), f"{cache}/{split} example {i}: rows differ from the tokens"
        total = 0.0
        for start in range(0, labels.numel(), ROWS_PER_PASS):
            logits = hidden[start:start + ROWS_PER_PASS] @ weight.T
            if bias is not None:
                logits += bias
            picked = logits.log_softmax(-1).gather(-1, labels[start:start + ROWS_PER_PASS, None])
            total -= float(picked.double().sum())
        nats.append(total)
        if (i + 1) % 200 == 0:
            print(f"  {cache.name}/{split}: {i + 1}/{n}", flush=True)
    return nats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cache_a", type=Path)
    parser.add_argument("cache_b", type=Path)
    parser.add_argument("--split", nargs=3, action="append", metavar=("SPLIT", "DATA", "OUT"), required=True)
    parser.add_argument("--config", default=CONFIG, help="the run config whose data settings the caches were "
                        f"written with (default {CONFIG})")
    args = parser.parse_args(argv)
    rules = TruncationRules.from_config(load_config(args.config, []).data)
    for split, data, out in args.split:
        a = response_nats(args.cache_a, split, Path(data), rules)
        b = response_nats(args.cache_b, split, Path(data), rules)
        lines = Path(data).read_text().splitlines()[:len(a)]
        records = [json.loads(line) for line in lines]
        routes = ["a" if x <= y else "b" for x, y in zip(a, b)]
        Path(out).write_text("".join(json.dumps({**r, "teacher": t}) + "\n" for r, t in zip(records, routes)))
        examples = load_examples(DataSource(path=data), "auto", "raise", len(a))[0]
        n_bytes = sum(len(e.response.encode("utf-8")) for e in examples)
        summary = {"split": split, "examples": len(routes), "to_a": routes.count("a"), "to_b": routes.count("b"),
                   "bits_per_byte_a": sum(a) / math.log(2) / n_bytes, "bits_per_byte_b": sum(b) / math.log(2) / n_bytes,
                   "bits_per_byte_routed": sum(map(min, a, b)) / math.log(2) / n_bytes}
        Path(f"{out}.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
