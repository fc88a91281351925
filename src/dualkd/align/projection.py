"""X-Token's sparse student -> teacher projection, built from the two tokenizers by string rules
(NVIDIA NeMo RL, `tools/x_token/`: the multi-token pass, the exact-map pass, the sort-and-cut pass).

    proj = xtoken_projection(student_tokenizer, teacher_tokenizer)   # Projection: indices, weights [V_s, k]
    q = proj.project(p_s, v_t)                                        # [N, V_s] probabilities -> [N, V_t]

Row s of the projection W [V_s, V_t] spreads student token s over the teacher tokens it stands for:
    multi-token   decode s, encode that text with the teacher's tokenizer (no specials) into t_1..t_m, keep the
                  first 4, and add w_i = 0.9·0.1^i / Σ_j 0.9·0.1^j to W[s, t_i]  (one token: weight 1; two:
                  0.909, 0.091); then the reverse walk: each teacher token decoded and encoded by the
                  student's tokenizer adds w_j to W[s_j, t]. Tokens whose text is `<|...|>` are skipped, as are
                  encodings that hold the other side's end-of-text token
    specials      each special token of the student's against each of the teacher's: similarity
                  0.6·difflib ratio + 0.4·Jaccard of their words (longer than 2 letters, split at < > | _);
                  pairs at or above 0.3 (the best 32 per student token) add 0.8·similarity
    normalize     every row divided by its sum; the 32 largest kept
    exact         a student token with the same bytes as a teacher token (align/vocab.py) gets a one-hot row
    cut           each row's `top_k` largest kept (the official runtime default: 4) and divided by its sum

A row can stay empty (a special token nothing resembles): that student token projects no mass.

Deviations from the official tools (docs/fidelity.md): exact pairs are tokens with identical bytes, not
identical raw token strings (`Ġa` and `▁a` are the same text); the special-token pass compares the
tokenizers' declared special tokens, not every vocabulary string that starts with `<` and ends with `>` (that
reads HTML pieces as specials and costs N_s·N_t string comparisons); the "scale trick" is left out: with it
the official tool sets the 32nd weight of every row to 0.2 before renormalizing, which for a row with fewer than
32 entries gives a sixth of the token's mass to whichever zero-weight column `topk` returned last.
"""

from __future__ import annotations

import difflib
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dualkd.align.vocab import shared_vocabulary

_IGNORED = ("<|endoftext|>", "<eos>")  # end-of-text tokens: never part of a multi-token mapping


@dataclass
class Projection:
    """W [V_s, V_t] as each row's `k` largest entries: teacher ids (-1 where a row has fewer) and weights."""

    indices: Tensor  # [V_s, k] long
    weights: Tensor  # [V_s, k] float, 0 where indices is -1; each non-empty row sums to 1

    def project(self, p: Tensor, v_t: int) -> Tensor:
        """p [N, V_s] -> p @ W [N, V_t] (differentiable in p)."""
        v_s = self.indices.shape[0]
        idx = self.indices.clamp(min=0).to(p.device)
        w = self.weights.to(device=p.device, dtype=p.dtype)
        out = p.new_zeros(p.shape[0], v_t)
        for j in range(idx.shape[1]):  # k passes of [N, V_s]: W is never dense
            out = out.scatter_add(1, idx[:, j].expand(p.shape[0], v_s), p * w[:, j])
        return out

    def dense(self, v_t: int) -> Tensor:
        """W as a dense [V_s, V_t] matrix (tests, small vocabularies)."""
        w = torch.zeros(self.indices.shape[0], v_t, dtype=self.weights.dtype)
        rows = torch.arange(self.indices.shape[0])[:, None].expand_as(self.indices)
        keep = self.indices >= 0
        return w.index_put_((rows[keep], self.indices[keep]), self.weights[keep], accumulate=True)


def _decay(m: int) -> list[float]:
    raw = [0.9 * 0.1**i for i in range(m)]
    return [w / sum(raw) for w in raw]


def _multi_token(source: Any, target: Any, v_source: int, counts: dict, *, student_side: bool,
                 tokens_to_cut: int) -> None:
    """Add each source token's re-encoding by the target tokenizer to `counts[(student, teacher)]`."""
    skip_source = {source.convert_tokens_to_ids(t) for t in _IGNORED if t in source.get_vocab()}
    skip_target = {target.convert_tokens_to_ids(t) for t in _IGNORED if t in target.get_vocab()}
    ids = [i for i in range(v_source) if i not in skip_source]
    texts = source.batch_decode([[i] for i in ids])  # as the official tool: decode, one token at a time
    keep = [(i, t) for i, t in zip(ids, texts) if not (t.startswith("<|") and t.endswith("|>"))]
    if not keep:
        return
    encoded = target([t for _, t in keep], add_special_tokens=False)["input_ids"]
    for (i, _), targets in zip(keep, encoded):
        if not targets or any(t in skip_target for t in targets):
            continue
        targets = targets[:tokens_to_cut]
        for t, w in zip(targets, _decay(len(targets))):
            counts[(i, t) if student_side else (t, i)] += w


def _similarity(a: str, b: str) -> float:
    def words(token: str) -> set[str]:
        return {w for w in re.sub(r"[<>|_]", " ", token.lower()).split() if len(w) > 2}

    wa, wb = words(a), words(b)
    jaccard = len(wa & wb) / len(wa | wb) if wa or wb else 0.0
    return 0.6 * difflib.SequenceMatcher(None, a, b).ratio() + 0.4 * jaccard


def _specials(student: Any, teacher: Any, counts: dict, *, threshold: float, per_token: int) -> None:
    s_special = dict(zip(student.all_special_ids, student.all_special_tokens))
    t_special = dict(zip(teacher.all_special_ids, teacher.all_special_tokens))
    for s, s_text in s_special.items():
        scored = sorted(((_similarity(s_text, t_text), t) for t, t_text in t_special.items()), reverse=True)
        for score, t in [x for x in scored if x[0] >= threshold][:per_token]:
            counts[(s, t)] += 0.8 * score


def xtoken_projection(student: Any, teacher: Any, *, v_s: int | None = None, v_t: int | None = None,
                      top_k: int = 4, tokens_to_cut: int = 4, build_top_k: int = 32, reverse: bool = True,
                      specials: bool = True, special_threshold: float = 0.3) -> Projection:
    """The projection of the module docstring, over the first v_s student and v_t teacher ids (default: every
    token of each tokenizer)."""
    v_s = len(student) if v_s is None else v_s
    v_t = len(teacher) if v_t is None else v_t
    counts: dict[tuple[int, int], float] = defaultdict(float)
    _multi_token(student, teacher, v_s, counts, student_side=True, tokens_to_cut=tokens_to_cut)
    if reverse:
        _multi_token(teacher, student, v_t, counts, student_side=False, tokens_to_cut=tokens_to_cut)
    if specials:
        _specials(student, teacher, counts, threshold=special_threshold, per_token=build_top_k)
    entries = [(s, t, w) for (s, t), w in counts.items() if s < v_s and t < v_t]
    # the rows as COO; only the build_top_k largest of each row survive, so no [V_s, V_t] dense matrix is built
    rows = torch.tensor([e[0] for e in entries], dtype=torch.long)
    cols = torch.tensor([e[1] for e in entries], dtype=torch.long)
    vals = torch.tensor([e[2] for e in entries], dtype=torch.float64)
    indices, weights = _row_top(rows, cols, vals, v_s, build_top_k)
    s_ids, t_ids = shared_vocabulary(student, teacher)
    exact = (s_ids < v_s) & (t_ids < v_t)
    indices[s_ids[exact]] = -1
    weights[s_ids[exact]] = 0.0
    indices[s_ids[exact], 0] = t_ids[exact]
    weights[s_ids[exact], 0] = 1.0
    indices, weights = _row_top(*_coo(indices, weights), v_s, top_k)
    return Projection(indices, weights.float())


def _coo(indices: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    keep = indices >= 0
    rows = torch.arange(indices.shape[0])[:, None].expand_as(indices)
    return rows[keep], indices[keep], weights[keep]


def _row_top(rows: Tensor, cols: Tensor, vals: Tensor, v_s: int, k: int) -> tuple[Tensor, Tensor]:
    """Per row of a COO matrix: its k largest entries (ties: lower column first), divided by their sum (the
    official tools normalize before the cut too, which changes nothing once the kept entries are
    renormalized)."""
    order = torch.argsort(cols, stable=True)
    rows, cols, vals = rows[order], cols[order], vals[order]
    order = torch.argsort(-vals, stable=True)
    rows, cols, vals = rows[order], cols[order], vals[order]
    order = torch.argsort(rows, stable=True)
    rows, cols, vals = rows[order], cols[order], vals[order]
    starts = torch.searchsorted(rows, torch.arange(v_s + 1))
    rank = torch.arange(rows.numel()) - starts[rows]
    keep = rank < k
    indices = torch.full((v_s, k), -1, dtype=torch.long)
    weights = torch.zeros(v_s, k, dtype=torch.float64)
    indices[rows[keep], rank[keep]] = cols[keep]
    weights[rows[keep], rank[keep]] = vals[keep].double()
    total = weights.sum(1, keepdim=True)
    return indices, weights / torch.where(total > 0, total, torch.ones_like(total))
