"""How much next-token probability a student (and DSKDv2's projected teacher target) puts on tokens that its
training data never uses: the measurement behind the reading of the cross-tokenizer rows in README.md here.

A BPE vocabulary holds every intermediate merge, and many of those pieces never occur in the tokenized data
(a word is always spelled with its longest piece). Mass on such "dead" pieces is mass that sampling turns into
spellings the data never had. Per run, on the dev set's response positions (response tokens + EOS):
- `unused`: how many of the student's tokens never occur in the tokenized student training data (prompts and
  responses);
- `student_mass`: the trained student's mean probability (τ = 1) on those tokens, and its mean entropy;
- for a DSKD-family run (`projectors.safetensors` beside the model): the student-space target, softmax(W_s ·
  P_t2s(h_t) / τ), at the positions the student-space KD reads (the ETA pairs; every response position with
  one tokenizer): its mass on those tokens, its entropy, the probability it gives the student's gold next
  token and how often its argmax is that token; `teacher`: the teacher's own distribution (τ = 1) at its
  response positions, its mass on the tokens of *its* vocabulary that the data never uses, and its entropy.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/methods_table/unused_token_mass.py runs/methods-table \\
        own-sft/lr0.003/seed10 own-dskdv2-eta/lr0.003/seed10 sft/lr0.003/seed10 dskd-fkl/lr0.003/seed10
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dualkd.align.pairs import ExactAligner
from dualkd.align.vocab import shared_vocabulary
from dualkd.config import load_config
from dualkd.data.collate import pad_batch
from dualkd.data.config import DataSource
from dualkd.data.dataset import TruncationRules, pad_id, tokenize_examples
from dualkd.data.readers import load_examples
from dualkd.lm import head_of, lm_forward

RULES = TruncationRules(max_length=64, max_prompt_length=40)


def tokenized(path: Path, tokenizer) -> list:
    examples, _ = load_examples(DataSource(path=str(path)))
    return [t for t in tokenize_examples(examples, tokenizer, RULES) if not isinstance(t, Exception)]


def response_distributions(model, tokenizer, items, temperature: float = 1.0, hidden_map=None, head=None):
    """Next-token probabilities [N, V] at every response position of `items` (optionally through a hidden
    map and another head: the projected teacher)."""
    out = []
    for start in range(0, len(items), 32):
        batch = pad_batch(items[start:start + 32], pad_id(tokenizer))
        with torch.no_grad():
            hidden = lm_forward(model, batch, hidden=True, logits=False).hidden[batch.loss_mask]  # [n, d]
            out.append(project(hidden, temperature, hidden_map, head if head is not None else head_of(model)))
    return torch.cat(out)


def project(hidden, temperature, hidden_map, head):
    if hidden_map is not None:
        hidden = hidden @ hidden_map.T
    weight, bias = head
    return torch.softmax((hidden @ weight.T + (bias if bias is not None else 0)).double() / temperature, -1)


def paired_target(student, tokenizer, teacher, teacher_tokenizer, students, teachers, temperature, t2s):
    """At the positions the student-space KD reads (ETA pairs; every response position with one tokenizer):
    the projected-teacher target [P, V_s] and the student's gold next token there [P]."""
    aligner = ExactAligner(tokenizer, teacher_tokenizer)
    targets, golds = [], []
    for s_item, t_item in zip(students, teachers):
        (s_pos, t_pos), = aligner([s_item], [t_item])
        with torch.no_grad():
            hidden = lm_forward(teacher, pad_batch([t_item], pad_id(teacher_tokenizer)), hidden=True,
                                logits=False).hidden[0]  # [T_t, d_t]
        targets.append(project(hidden[torch.as_tensor(t_pos)], temperature, t2s, head_of(student)))
        golds.append(torch.as_tensor(s_item.ids)[torch.as_tensor(s_pos) + 1])
    return torch.cat(targets), torch.cat(golds)


def summarize(probs: torch.Tensor, unused: torch.Tensor) -> dict[str, float]:
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    return {"mass_on_unused": float(probs[:, unused].sum(-1).mean()), "entropy": float(entropy.mean())}


def main(table: Path, runs: list[str]) -> None:
    data = table / "data"
    teacher_dir = table / "teacher" / "final"
    results = {}
    for name in runs:
        run = table / "runs" / name
        final = run / "final"
        tokenizer = AutoTokenizer.from_pretrained(final)
        student = AutoModelForCausalLM.from_pretrained(final).eval()
        seen = torch.zeros(len(tokenizer), dtype=torch.bool)
        for item in tokenized(data / "student-train.jsonl", tokenizer):
            seen[item.ids] = True
        unused = (~seen).nonzero().squeeze(-1)
        dev = tokenized(data / "dev.jsonl", tokenizer)
        entry = {"vocab": len(tokenizer), "unused": int(unused.numel()),
                 "student": summarize(response_distributions(student, tokenizer, dev), unused)}
        projectors = final / "projectors.safetensors"
        if projectors.exists():
            cfg = load_config(run / "config.yaml")
            teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
            teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
            teacher_dev = tokenized(data / "dev.jsonl", teacher_tokenizer)
            t2s = load_file(str(projectors))["t2s.weight"]  # [d_s, d_t]
            tau = cfg.objective.temperature
            teacher_seen = torch.zeros(len(teacher_tokenizer), dtype=torch.bool)
            for item in tokenized(data / "student-train.jsonl", teacher_tokenizer):
                teacher_seen[item.ids] = True
            entry["teacher"] = summarize(response_distributions(teacher, teacher_tokenizer, teacher_dev),
                                         (~teacher_seen).nonzero().squeeze(-1))
            target, gold = paired_target(student, tokenizer, teacher, teacher_tokenizer, dev, teacher_dev, tau, t2s)
            entry["target"] = {**summarize(target, unused), "positions": int(gold.numel()),
                               "gold_probability": float(target.gather(-1, gold[:, None]).mean()),
                               "argmax_is_gold": float((target.argmax(-1) == gold).double().mean())}
            student_ids, _ = shared_vocabulary(tokenizer, teacher_tokenizer)
            entry["shared_vocabulary"] = int(len(student_ids))
        results[name] = entry
        print(name, json.dumps(entry), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
