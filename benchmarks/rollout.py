"""Rollout speed: generated tokens/s of dualkd's batched, KV-cached sampling vs one sample at a time.

    python benchmarks/rollout.py                 # tiny random GPT-2, and SmolLM2-135M if the real models exist
    python benchmarks/rollout.py --prompts 32 --new-tokens 64 --reps 5

Three ways to sample the same prompts at temperature 1, in one process, interleaved in rotating order after a
warm-up, --reps repetitions (benchmarks/harness.py); rates in generated tokens/s, min / median / max, and the
speed-up per repetition:
- dualkd: `dualkd.generate.sample_token_ids` (the engine used by `dualkd eval` and on-policy training):
  prompts of similar length batched (left padding), Hugging Face `generate` with the KV cache;
- one at a time, KV cache: the same `generate`, one prompt per call;
- naive loop: one prompt at a time, each new token from a full forward over the whole sequence (no cache).
Every sample is forced to exactly --new-tokens tokens (no EOS stop) so all three do the same work per token;
the one-at-a-time ways run on the first --sequential-prompts prompts (the naive loop on --naive-prompts: it is
~30x slower on a real model). Prints a warning when the load average says the machine was shared.
Needs ../shared/tools/real-models for the SmolLM2 case (skipped otherwise).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.harness

from benchmarks.harness import interleaved, spread, start_load  # noqa: E402

MODELS = Path(os.environ.get("DUALKD_REAL_MODELS", Path.home() / ".cache" / "dualkd-real"))


def naive_loop(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> int:
    made = 0
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            for _ in range(new_tokens):
                logits = model(input_ids=ids, use_cache=False).logits[:, -1]
                nxt = torch.multinomial(torch.softmax(logits.float(), -1), 1)
                ids = torch.cat([ids, nxt], dim=1)
                made += 1
    return made


def one_at_a_time(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, pad: int) -> int:
    made = 0
    with torch.no_grad():
        for p in prompts:
            out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, top_k=0,
                                 pad_token_id=pad)
            made += out.shape[1] - len(p)
    return made


def batched(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, pad: int, batch: int) -> int:
    from dualkd.config import GenerationConfig
    from dualkd.generate import sample_token_ids

    settings = GenerationConfig(max_new_tokens=new_tokens, max_length=max(map(len, prompts)) + new_tokens,
                                max_prompt_length=max(map(len, prompts)), batch_size=batch, no_repeat_ngram_size=0)
    out = sample_token_ids(model, prompts, settings, pad, eos_id=None, seed=0)
    return sum(map(len, out))


def run_case(name: str, model: torch.nn.Module, prompts: list[list[int]], args: argparse.Namespace, pad: int) -> None:
    model.eval()
    k, n = min(len(prompts), args.sequential_prompts), min(len(prompts), args.naive_prompts)
    variants = {
        f"dualkd batched (batch {args.batch_size}), KV cache": lambda: batched(model, prompts, args.new_tokens, pad,
                                                                              args.batch_size),
        f"one at a time, KV cache ({k} prompts)": lambda: one_at_a_time(model, prompts[:k], args.new_tokens, pad),
        f"naive loop, no cache ({n} prompts)": lambda: naive_loop(model, prompts[:n], args.new_tokens),
    }
    timing = interleaved(variants, reps=args.reps, threads=torch.get_num_threads())
    rates = {label: [timing.last[label] / s for s in timing.seconds[label]] for label in variants}
    print(f"\n{name}: {len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{args.new_tokens} new tokens each; tokens/s min / median / max over {args.reps} interleaved reps")
    for label, r in rates.items():
        print(f"  {label:44} {spread(r, '{:,.1f}')}")
    ours, cached, naive = rates.values()
    print(f"  speed-up over one at a time (cached): {spread([a / b for a, b in zip(ours, cached)], '{:.1f}')}x; "
          f"over the naive loop: {spread([a / b for a, b in zip(ours, naive)], '{:.1f}')}x")
    print(f"  load average {timing.load_before:.2f} before, {timing.load_after:.2f} after"
          + ("" if timing.quiet else " - SHARED MACHINE: these figures are not figures"), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sequential-prompts", type=int, default=8, help="prompts sampled one at a time, cached")
    parser.add_argument("--naive-prompts", type=int, default=2, help="prompts of the naive loop")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    start_load()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, fp32")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    tiny = GPT2LMHeadModel(GPT2Config(vocab_size=1024, n_layer=4, n_embd=128, n_head=4, n_positions=256,
                                 bos_token_id=0, eos_token_id=0))
    prompts = [torch.randint(0, 1024, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 48, (args.prompts,), generator=g)]
    run_case("tiny GPT-2 (0.9M params, random init)", tiny, prompts, args, pad=0)

    folder = MODELS / "smollm2-135m-instruct"
    if not folder.exists():
        print(f"\nSmolLM2-135M: skipped ({folder} not found)")
        return
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly" / "test.jsonl"
    import json

    texts = [json.loads(line)["prompt"] for line in data.read_text().splitlines()[: args.prompts]] if data.exists() \
        else [f"Write a short note about topic number {i}." for i in range(args.prompts)]
    prompts = [tok(t, add_special_tokens=False)["input_ids"][:128] for t in texts]
    run_case("SmolLM2-135M-Instruct", model, prompts, args, pad=tok.pad_token_id or tok.eos_token_id)


if __name__ == "__main__":
    main()
