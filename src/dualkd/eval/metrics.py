"""Text metrics of the papers' protocols, each a pure function of (hypothesis, references).

- ROUGE-L (DSKD/MiniLLM): F-measure of `rouge_score`'s `RougeScorer(["rougeL"], use_stemmer=True)` with its
  default tokenizer, the maximum over references, ×100. No normalization beyond what rouge_score does.
- Exact match (logged by the same scripts): SQuAD normalization (lowercase, drop punctuation and the articles
  a/an/the, collapse whitespace) of both sides, 1.0 if any reference matches, ×100.
- BLEU and chrF (translation): corpus-level sacrebleu with its defaults (13a tokenization, chrF with
  character 6-grams, β = 2).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from functools import lru_cache

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(hypothesis: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure ×100, best over `references`."""
    scorer = _rouge_scorer()
    return 100.0 * max(scorer.score(ref, hypothesis)["rougeL"].fmeasure for ref in references)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization used for exact match."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(hypothesis: str, references: Sequence[str]) -> float:
    """100 if the normalized hypothesis equals any normalized reference, else 0."""
    hyp = normalize_answer(hypothesis)
    return 100.0 * any(hyp == normalize_answer(ref) for ref in references)


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str]]:
    """sacrebleu wants one stream per reference index; pad sentences with fewer references with their first."""
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else refs[0] for refs in references] for k in range(width)]


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), _reference_streams(references)).score)


def chrf(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, β = 2)."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(hypotheses), _reference_streams(references)).score)


SENTENCE_METRICS = {"rougeL": rouge_l, "exact_match": exact_match}
"""Metrics averaged over sentences."""
CORPUS_METRICS = {"bleu": bleu, "chrf": chrf}
"""Metrics computed over the whole corpus."""
METRICS = (*SENTENCE_METRICS, *CORPUS_METRICS)


def score(metric: str, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """One number for a whole test set: the sentence mean for ROUGE-L/EM, the corpus score for BLEU/chrF."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference lists")
    if metric in SENTENCE_METRICS:
        fn = SENTENCE_METRICS[metric]
        return sum(fn(h, r) for h, r in zip(hypotheses, references)) / max(len(hypotheses), 1)
    if metric in CORPUS_METRICS:
        return CORPUS_METRICS[metric](hypotheses, references)
    raise ValueError(f"unknown metric {metric!r}; choose from {list(METRICS)}")
