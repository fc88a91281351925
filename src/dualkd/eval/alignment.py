"""Evaluation of an aligned model on held-out preference pairs (AlignDistil's analysis, its Table 3).

    dualkd align-eval runs/ad --pairs prefs_test.jsonl --dpo runs/dpo --reference SmolLM2 --out runs/ad/align

- implicit reward accuracy and margin: r(y) = β·(log π(y|x) − log π_ref(y|x)) of whole responses; accuracy is
  the share of pairs with r(chosen) > r(rejected) (for a DPO model: its own preference accuracy);
- on responses the model samples for the pairs' prompts (the eval protocol's sampling): mean response length
  in tokens, the sequence-level KL(π ‖ π_dpo) = Σ_t KL(π(·|s_t) ‖ π_dpo(·|s_t)) averaged over samples (how far
  the model moved from the DPO model: AlignDistil's over-optimization check), and ROUGE-L against `chosen`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dualkd.data.collate import TokenizedExample, pad_batch
from dualkd.data.config import DataConfig, DataSource
from dualkd.data.dataset import pad_id
from dualkd.data.preferences import make_preference_dataset, pairs_of
from dualkd.data.readers import load_examples
from dualkd.errors import ModelError
from dualkd.eval.metrics import rouge_l
from dualkd.generate import GenerationConfig, load_for_generation, prompt_ids, sample_token_ids
from dualkd.lm import head_of, lm_forward, response_logprobs
from dualkd.losses.fused import fused_divergence


@torch.no_grad()
def implicit_rewards(model: Any, reference: Any, dataset: Any, beta: float, batch_size: int = 8
                     ) -> dict[str, float]:
    """Accuracy (%) and mean margin of β·log π/π_ref over the preference pairs of `dataset`."""
    device = next(model.parameters()).device
    correct, margins = 0, []
    for start in range(0, len(dataset), batch_size):
        batch = dataset.collate(list(range(start, min(start + batch_size, len(dataset))))).to(device)
        P = pairs_of(batch)
        reward = beta * (response_logprobs(model, batch.student) - response_logprobs(reference, batch.student))
        margin = reward[:P] - reward[P:]
        correct += int((margin > 0).sum())
        margins += margin.tolist()
    return {"reward_accuracy": 100.0 * correct / max(len(margins), 1),
            "reward_margin": sum(margins) / max(len(margins), 1)}


@torch.no_grad()
def sequence_kl(model: Any, dpo: Any, sequences: list[TokenizedExample], pad: int, batch_size: int = 8
                ) -> list[float]:
    """Σ_t KL(π(·|s_t) ‖ π_dpo(·|s_t)) over each sequence's response positions (fused, no [N, V] logits)."""
    device = next(model.parameters()).device
    w_m, b_m = head_of(model)
    w_d, b_d = head_of(dpo)
    V = min(w_m.shape[0], w_d.shape[0])
    out: list[float] = []
    for start in range(0, len(sequences), batch_size):
        tokens = pad_batch(sequences[start:start + batch_size], pad).to(device)
        h_m = lm_forward(model, tokens, hidden=True, logits=False).hidden
        h_d = lm_forward(dpo, tokens, hidden=True, logits=False).hidden
        per_token = fused_divergence("rkl", h_m, w_m[:V], h_d, w_d[:V], mask=tokens.loss_mask, reduction="none",
                                     student_bias=b_m[:V] if b_m is not None else None,
                                     teacher_bias=b_d[:V] if b_d is not None else None)
        out += per_token.sum(-1).tolist()
    return out


def evaluate_alignment(model_path: str | Path, pairs_path: str | Path, dpo_path: str | Path,
                       reference_path: str | Path, beta: float, settings: GenerationConfig, seed: int = 10,
                       max_pairs: int | None = None, out: str | Path | None = None) -> dict[str, Any]:
    model, tokenizer = load_for_generation(model_path)
    dpo, _ = load_for_generation(dpo_path)
    reference, _ = load_for_generation(reference_path)
    examples, report = load_examples(DataSource(path=str(pairs_path)), "preference", "raise", max_pairs)
    rules = DataConfig(train=DataSource(path=str(pairs_path)), max_length=settings.max_length,
                       max_prompt_length=min(settings.max_prompt_length, settings.max_length - 1))
    dataset = make_preference_dataset(examples, report, rules, tokenizer)
    result: dict[str, Any] = {"model": str(model_path), "pairs": len(dataset), "beta": beta, "seed": seed,
                              **implicit_rewards(model, reference, dataset, beta)}

    prompts = prompt_ids(dataset.examples, tokenizer, settings)
    samples = sample_token_ids(model, prompts, settings, pad_id(tokenizer), tokenizer.eos_token_id, seed=seed,
                               label="sampling", progress=None, keep_eos=True)
    sequences = [TokenizedExample(ids=p + s, offsets=[(0, 0)] * (len(p) + len(s)), prompt_len=len(p), text="",
                                  prompt_chars=0) for p, s in zip(prompts, samples) if s]
    if not sequences:
        raise ModelError(f"{model_path}: every sampled response was empty")
    kls = sequence_kl(model, dpo, sequences, pad_id(tokenizer))
    texts = [tokenizer.decode(s, skip_special_tokens=True).strip() for s in samples]
    result.update({
        "response_length": sum(len(s) for s in samples) / len(samples),
        "kl_to_dpo": sum(kls) / len(kls),
        "rougeL": sum(rouge_l(t, [ex.response]) for t, ex in zip(texts, dataset.examples)) / len(texts),
    })
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "alignment.json").write_text(json.dumps(result, indent=2))
        with (out / "samples.jsonl").open("w", encoding="utf-8") as f:
            for ex, text in zip(dataset.examples, texts):
                prompt = ex.prompt if ex.messages is None else ex.messages[-2]["content"]
                f.write(json.dumps({"prompt": prompt, "generation": text, "references": [ex.response]},
                                   ensure_ascii=False) + "\n")
    return result
