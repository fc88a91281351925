"""The `dualkd` command. Thin: parse arguments, call the library, print errors as one clear message.

    dualkd train CONFIG [key.sub=value ...] [--resume [auto]] [--resume-with-changes]
    dualkd config CONFIG [key.sub=value ...]        print the resolved config
    dualkd generate MODEL --data FILE --out FILE    responses for a dataset (e.g. teacher outputs for SeqKD)
    dualkd eval MODEL [--suite dolly-protocol --data-dir DIR] [FILE ...]   the papers' test protocol
    dualkd eval --rescore EVAL_DIR                  recompute the scores from the saved generations
    dualkd report RUN_DIR ... [--teacher DIR]       Markdown + plots for runs side by side
    dualkd tokenizer train FILE ... --out DIR       a BPE tokenizer for a corpus (e.g. --fields de,en)
    dualkd demo [--output-dir runs/demo]            the whole workflow in miniature on CPU (the main job)
    dualkd serve-teacher TEACHER.gguf [--port 8080] a teacher server that also ships hidden states
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dualkd import __version__
from dualkd.errors import ConfigError, DualKDError

if TYPE_CHECKING:
    from dualkd.config import GenerationConfig


class _ResumeAction(argparse.Action):
    """`--resume` (True) or `--resume auto`; an override written right after `--resume` stays an override."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any,
                 option_string: str | None = None) -> None:
        if value is True or value == "auto":
            setattr(namespace, self.dest, value)
            return
        if "=" not in value:
            parser.error(f"--resume takes no value, or `auto`; got {value!r}")
        setattr(namespace, self.dest, True)
        namespace.overrides_after_resume = [*getattr(namespace, "overrides_after_resume", []), value]


def _cmd_train(args: argparse.Namespace) -> int:
    from dualkd.config import load_config
    from dualkd.train.loop import train
    from dualkd.train.signals import TrainingStopped

    cfg = load_config(args.config, [*args.overrides, *getattr(args, "overrides_after_resume", [])])
    try:
        run_dir = train(cfg, resume=args.resume or args.resume_with_changes, accept_changes=args.resume_with_changes)
    except TrainingStopped as e:
        print(f"dualkd: {e}", file=sys.stderr)
        return 128 + e.signum
    print(run_dir)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from dualkd.config import load_config

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True), end="")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dualkd.demo import run_demo

    run_demo(args.output_dir, quick=args.quick)
    return 0


def _positive_int(text: str) -> int:
    """An argparse type: a whole number ≥ 1 (counts, sizes, k)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed here: give a number ≥ 1")
    return value


def _generation_settings(args: argparse.Namespace) -> GenerationConfig:
    from dualkd.config import GenerationConfig

    fields = {k: getattr(args, k) for k in ("max_length", "max_prompt_length", "max_new_tokens", "temperature",
                                            "top_p", "top_k", "no_repeat_ngram_size", "num_beams", "batch_size")
              if getattr(args, k) is not None}
    if getattr(args, "translation", None) and args.no_repeat_ngram_size is None:
        fields["no_repeat_ngram_size"] = 0  # the n-gram block is the instruction-following protocol's, not NMT's
    return GenerationConfig(do_sample=not (args.greedy or (args.num_beams or 1) > 1), **fields)


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (defaults: the DSKD/MiniLLM test protocol)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding (one run, no seeds)")
    g.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    g.add_argument("--top-p", type=float, help="nucleus sampling (default 1.0: off)")
    g.add_argument("--top-k", type=int, help="top-k sampling (default 0: off)")
    g.add_argument("--no-repeat-ngram-size", type=int,
                   help="block repeated n-grams (default 6, what the papers' test scripts used; 0 with --translation)")
    g.add_argument("--num-beams", type=_positive_int, help="beam search width (>1 decodes with beams, no sampling)")
    g.add_argument("--max-length", type=_positive_int, help="prompt + response tokens (default 512)")
    g.add_argument("--max-prompt-length", type=_positive_int, help="prompt tokens kept (default 256)")
    g.add_argument("--max-new-tokens", type=_positive_int,
                   help="cap on new tokens (default: max-length - max-prompt-length)")
    g.add_argument("--batch-size", type=_positive_int, help="prompts per batch (default 16)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--translation", metavar="SRC:TGT",
                   help="test files are language pairs such as {\"de\": ..., \"en\": ...}: translate SRC to TGT, "
                        "score BLEU and chrF")


def _translation(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    src, sep, tgt = value.partition(":")
    if not sep or not src or not tgt:
        raise DualKDError(f"--translation expects SRC:TGT such as de:en, got {value!r}")
    return src, tgt


def _cmd_generate(args: argparse.Namespace) -> int:
    from dualkd.eval.suites import resolve_test_sets
    from dualkd.generate import generate_responses, load_for_generation, write_generated_dataset

    settings = _generation_settings(args)
    (test,), _ = resolve_test_sets([args.data], translation=_translation(args.translation),
                                   max_examples=args.max_examples)
    model, tokenizer = load_for_generation(args.model, args.dtype)
    texts = generate_responses(model, tokenizer, test.examples, settings, seed=args.seed)
    written, empty = write_generated_dataset(test.examples, texts, args.out)
    if empty:
        print(f"dualkd: {empty} empty generation(s) left out of {args.out}", file=sys.stderr)
    print(f"{args.out}: {written} examples")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from dualkd.eval.harness import evaluate, rescore
    from dualkd.eval.suites import resolve_test_sets

    if args.rescore:
        print(json.dumps({name: s["mean"] for name, s in rescore(args.rescore).items()}, indent=2))
        return 0
    if args.model is None:
        raise DualKDError("give a model folder or run directory to evaluate (or --rescore EVAL_DIR)")
    sets, missing = resolve_test_sets(args.files, suite=args.suite, data_dir=args.data_dir,
                                      translation=_translation(args.translation), max_examples=args.max_examples)
    for name, why in missing.items():
        print(f"dualkd: test set {name!r} skipped: {why}", file=sys.stderr)
    seeds = [int(s) for s in args.seeds.split(",")]
    result = evaluate(args.model, sets, _generation_settings(args), seeds=seeds, out_dir=args.out,
                      missing=missing, dtype=args.dtype)
    from pathlib import Path

    print((Path(result["out_dir"]) / "scores.md").read_text(), end="")
    print(result["out_dir"])
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from dualkd.data.tokenizers import corpus_texts, train_tokenizer

    fields = [f for f in args.fields.split(",") if f] if args.fields else None
    texts = corpus_texts(args.files, fields=fields, max_examples=args.max_examples)
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab_size, style=args.style, show_progress=sys.stderr.isatty())
    tokenizer.save_pretrained(args.out)
    print(f"{args.out}: {args.style} BPE, {len(tokenizer)} tokens, trained on {len(texts)} texts")
    return 0


def _cmd_preference_build(args: argparse.Namespace) -> int:
    from dualkd.config import DataSource
    from dualkd.data.preferences import build_preference_set
    from dualkd.data.readers import load_examples
    from dualkd.generate import load_for_generation

    examples, _ = load_examples(DataSource(path=args.data), "auto", "raise", args.max_examples)
    model, tokenizer = load_for_generation(args.model, args.dtype)
    written, dropped = build_preference_set(examples, model, tokenizer, _generation_settings(args), args.out,
                                            seed=args.seed)
    print(f"{args.out}: {written} pairs (chosen: the reference; rejected: {args.model}'s sample)"
          + (f"; {dropped} left out (empty sample or equal to the reference)" if dropped else ""))
    return 0


def _cmd_align_eval(args: argparse.Namespace) -> int:
    import json

    from dualkd.eval.alignment import evaluate_alignment

    out = args.out or str(Path(args.model) / "align-eval")
    result = evaluate_alignment(args.model, args.pairs, args.dpo, args.reference, args.beta,
                                _generation_settings(args), seed=args.seed, max_pairs=args.max_examples, out=out)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_judge(args: argparse.Namespace) -> int:
    import json

    from rich.progress import Progress

    from dualkd.eval.judge import JudgeClient, api_key_from_env, judge_pairwise, read_generations

    candidate, baseline = read_generations(args.candidate), read_generations(args.baseline)
    if args.max_examples:
        candidate = candidate[: args.max_examples]
    client = JudgeClient(args.endpoint, args.model, api_key=api_key_from_env(args.api_key_env),
                         cache_path=Path(args.cache) if args.cache else None, max_requests=args.max_requests,
                         retries=args.retries, timeout=args.timeout)
    with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("judging", total=len(candidate))
        result = judge_pairwise(candidate, baseline, client, both_orders=not args.one_order,
                                progress=lambda: bar.advance(task))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    summary = {k: v for k, v in result.items() if k != "items"}
    print(json.dumps(summary, indent=2))
    if result["stopped"]:
        print(f"dualkd judge: stopped early ({result['stopped']}); {result['judged']} of {result['of']} judged; "
              "rerun with a larger budget to continue from the cache", file=sys.stderr)
    return 0


def _cmd_cache_teacher(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from dualkd.config import load_config
    from dualkd.train.cache_teacher import cache_teacher

    hf_logging.disable_progress_bar()  # per-file loading bars
    cfg = load_config(args.config, args.overrides)
    manifests = cache_teacher(cfg, args.out, k=args.top_k, hidden=args.hidden, encoding=args.encoding,
                              shard_examples=args.shard_examples, batch_size=args.batch_size,
                              overwrite=args.overwrite)
    for split, manifest in zip(("train", "dev"), manifests):
        print(f"{Path(args.out) / split}: {manifest['examples']} examples, top-{args.top_k} {args.encoding}"
              + (", hidden states" if args.hidden else "") + f", {len(manifest['complete'])} shards")
    print(f"train from it with: dualkd train {args.config} teacher.cache={args.out}")
    return 0


def _cmd_serve_teacher(args: argparse.Namespace) -> int:
    import importlib.util

    from dualkd.teachers import hidden_server

    if importlib.util.find_spec("llama_cpp") is None:
        raise ConfigError("serve-teacher needs llama.cpp's Python server: pip install 'dualkd[serve]'")
    if not Path(args.model).is_file():
        raise ConfigError(f"serve-teacher: no GGUF file at {args.model}")
    print(f"serving {args.model} at http://{args.host}:{args.port} (llama.cpp's routes + {hidden_server.ROUTE}); "
          f"train with teacher.kind=hidden_server, teacher.server.url=http://{args.host}:{args.port}")
    return hidden_server.run(args)


def _cmd_likelihood(args: argparse.Namespace) -> int:
    from dualkd.eval.likelihood import response_likelihood
    from dualkd.eval.suites import resolve_test_sets
    from dualkd.generate import load_for_generation

    (test,), _ = resolve_test_sets([args.data], max_examples=args.max_examples)
    model, tokenizer = load_for_generation(args.model, args.dtype)
    result = {"model": str(args.model), "data": test.path,
              **response_likelihood(model, tokenizer, test.examples, batch_size=args.batch_size)}
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from dualkd.prune import prune_folder

    try:
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    except ValueError:
        raise ConfigError(f"--layers {args.layers}: block indices separated by commas, e.g. 0,3,5,11") from None
    out = prune_folder(args.model, args.out, keep=args.keep, layers=layers, overwrite=args.overwrite)
    info = json.loads((out / "pruned.json").read_text())
    print(f"{out}: {len(info['kept_layers'])} of {info['source_layers']} blocks kept {info['kept_layers']}, "
          f"{info['parameters'] / 1e6:.1f}M parameters")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from dualkd.report import report

    print(report(args.runs, args.out, teacher=args.teacher, title=args.title))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualkd", description="Knowledge distillation for language models.")
    parser.add_argument("--version", action="version", version=f"dualkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a student (SFT or distillation) from a YAML config",
                       description="Train from a YAML config. Overrides such as `optimization.lr=1e-3` or "
                                   "`objective.name=kd` are applied on top of the file.")
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (values parsed as YAML)")
    p.add_argument("--resume", nargs="?", const=True, default=False, action=_ResumeAction, metavar="auto",
                   help="continue from the latest complete checkpoint in output_dir (exactly, on CPU); "
                        "`--resume auto`: resume when a complete checkpoint exists, start otherwise")
    p.add_argument("--resume-with-changes", action="store_true",
                   help="resume although settings of the run changed (refused otherwise); each change is logged")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("config", help="validate a config and print it with every default filled in",
                       description="Validate a config (with overrides) and print the resolved YAML.")
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("generate", help="generate responses for a dataset (jsonl out, one line per example)",
                       description="Generate a response for every example of a dataset with a trained model; the "
                                   "output file has prompt/output lines, readable as a training set (SeqKD).")
    p.add_argument("model", help="model folder or run directory")
    p.add_argument("--data", required=True, help="jsonl in any supported format (prompt/output, alpaca, messages)")
    p.add_argument("--out", required=True, help="output jsonl")
    p.add_argument("--seed", type=int, default=10, help="sampling seed (default 10)")
    p.add_argument("--max-examples", type=_positive_int, help="only the first N examples")
    _add_generation_options(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("eval", help="score a model on test sets with the papers' protocol",
                       description="Sample responses (5 seeds by default), score ROUGE-L and exact match (BLEU and "
                                   "chrF for translation), save generations beside scores.json and scores.md.")
    p.add_argument("model", nargs="?", help="model folder or run directory (a run's best/ or final/ model)")
    p.add_argument("files", nargs="*", help="test files (jsonl)")
    p.add_argument("--suite", choices=["dolly-protocol"],
                   help="dolly, self_inst, vicuna, sinst and uinst (first 10,000) test sets under --data-dir")
    p.add_argument("--data-dir", help="folder with <set>/test.jsonl for --suite")
    p.add_argument("--seeds", default="10,20,30,40,50", help="comma-separated sampling seeds")
    p.add_argument("--max-examples", type=_positive_int, help="only the first N examples of each set")
    p.add_argument("--out", help="output folder (default: <run>/eval)")
    p.add_argument("--rescore", metavar="EVAL_DIR", help="recompute the scores of an evaluation from its generations")
    _add_generation_options(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("tokenizer", help="tokenizer tools: `dualkd tokenizer train`",
                       description="Train a BPE tokenizer on a corpus (for models trained from scratch).")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train a BPE tokenizer on jsonl files and save it as a Hugging Face folder",
                        description="Train a byte-level (GPT-2-like) or SentencePiece-style BPE tokenizer on jsonl "
                                    "files; with --fields de,en one tokenizer is shared by both sides of a parallel "
                                    "corpus. The folder loads with AutoTokenizer and has EOS/BOS/PAD tokens.")
    t.add_argument("files", nargs="+", help="jsonl files")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--vocab-size", type=_positive_int, default=8000, help="vocabulary size (default 8000)")
    t.add_argument("--style", choices=["metaspace", "byte_level"], default="metaspace",
                   help="metaspace: SentencePiece-like with byte fallback (default); byte_level: GPT-2-like")
    t.add_argument("--fields", help="comma-separated string fields to read (default: prompts and responses)")
    t.add_argument("--max-examples", type=_positive_int, help="only the first N records of each file")
    t.set_defaults(func=_cmd_tokenizer_train)

    p = sub.add_parser("preference", help="preference data tools: `dualkd preference build`",
                       description="Make preference pairs (prompt/chosen/rejected) for DPO.")
    psub = p.add_subparsers(dest="preference_command", required=True, metavar="ACTION")
    b = psub.add_parser("build", help="pair each reference response (chosen) with a model's sample (rejected)",
                        description="For every example of an instruction set, the reference response becomes "
                                    "`chosen` and a sample from MODEL (a weaker model) `rejected`.")
    b.add_argument("model", help="the model whose samples are rejected (folder or run directory)")
    b.add_argument("--data", required=True, help="jsonl instruction set (prompt/output, alpaca or messages)")
    b.add_argument("--out", required=True, help="output jsonl of preference pairs")
    b.add_argument("--seed", type=int, default=10, help="sampling seed (default 10)")
    b.add_argument("--max-examples", type=_positive_int, help="only the first N examples")
    _add_generation_options(b)
    b.set_defaults(func=_cmd_preference_build)

    p = sub.add_parser("align-eval", help="alignment metrics on held-out preference pairs",
                       description="Implicit-reward accuracy and margin against a reference model, and on the "
                                   "model's own samples: response length, KL to the DPO model, ROUGE-L vs chosen.")
    p.add_argument("model", help="the model to evaluate (folder or run directory)")
    p.add_argument("--pairs", required=True, help="held-out preference pairs (jsonl)")
    p.add_argument("--dpo", required=True, help="the DPO model (for KL(model || DPO))")
    p.add_argument("--reference", required=True, help="the reference model of the implicit reward (DPO's start)")
    p.add_argument("--beta", type=float, default=0.1, help="β of the implicit reward (default 0.1)")
    p.add_argument("--seed", type=int, default=10, help="sampling seed (default 10)")
    p.add_argument("--max-examples", type=_positive_int, help="only the first N pairs")
    p.add_argument("--out", help="output folder (default: <model>/align-eval)")
    _add_generation_options(p)
    p.set_defaults(func=_cmd_align_eval)

    p = sub.add_parser("judge", help="pairwise LLM-as-judge win rate through an OpenAI-compatible endpoint",
                       description="Win rate of CANDIDATE's responses against BASELINE's, matched by prompt, each "
                                   "pair judged in both orders. Generation files from `dualkd eval` or `dualkd "
                                   "generate`. Answers are cached; failed requests are retried with backoff.")
    p.add_argument("candidate", help="jsonl with prompt + generation (or output)")
    p.add_argument("baseline", help="jsonl with prompt + generation (or output)")
    p.add_argument("--endpoint", required=True, help="base URL, e.g. http://127.0.0.1:8000/v1 (a vLLM server)")
    p.add_argument("--model", required=True, help="the judge model's name at the endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--cache", default="judge-cache.jsonl", help="answer cache (jsonl; default ./judge-cache.jsonl)")
    p.add_argument("--max-requests", type=_positive_int, help="stop after sending this many requests (retries count)")
    p.add_argument("--retries", type=int, default=4, help="retries per request on timeouts, 429 and 5xx")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--one-order", action="store_true", help="judge each pair once (candidate first)")
    p.add_argument("--max-examples", type=_positive_int, help="only the first N candidate prompts")
    p.add_argument("--out", help="write the full result (per-prompt votes) as JSON here")
    p.set_defaults(func=_cmd_judge)

    p = sub.add_parser("cache-teacher", help="run a config's teacher once over its data and cache its top-k",
                       description="Write the teacher's top-k next-token log-probabilities (+ the tail mass) and "
                                   "optionally its last hidden states for every response token of the config's "
                                   "train (and dev) data; train from it with teacher.cache=OUT. "
                                   "Resumable: rerun to continue after a crash.")
    p.add_argument("config", help="the run config whose teacher and data to cache")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--out", required=True, help="cache folder (new, empty, or a cache to resume)")
    p.add_argument("--overwrite", action="store_true", help="write into --out even if it holds something else")
    p.add_argument("--top-k", type=_positive_int, default=64, help="tokens kept per position (default 64)")
    p.add_argument("--hidden", action="store_true", help="also keep the teacher's last hidden states (bf16)")
    p.add_argument("--encoding", choices=["packed", "float16", "float32"], default="packed",
                   help="how the top-k are stored: packed (default; ~2.3 bytes per entry, KD loss within ~1e-3 "
                        "nats/token of float16, docs/benchmark-cache.md) or plain float16/float32 "
                        "log-probabilities (+ 2-4 bytes per id)")
    p.add_argument("--shard-examples", type=_positive_int, default=1024, help="examples per shard (default 1024)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="teacher batch size (default 8)")
    p.set_defaults(func=_cmd_cache_teacher)

    p = sub.add_parser("serve-teacher", help="serve a GGUF teacher: llama.cpp's server + its hidden states",
                       description="llama.cpp's Python server (completions, tokenize) on a GGUF teacher, plus the "
                                   "route that returns its last hidden states for given token ids "
                                   "(teacher.kind: hidden_server). Needs dualkd[serve].")
    p.add_argument("model", help="the teacher as a GGUF file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--n-ctx", type=int, default=2048, help="the longest sequence served, in tokens")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: llama.cpp's choice)")
    p.set_defaults(func=_cmd_serve_teacher)

    p = sub.add_parser("likelihood", help="CE per response token and bits per byte of a model on a dataset",
                       description="Cross-entropy of a model on the reference responses of a jsonl file: per "
                                   "token (nats, depends on the tokenizer) and in bits per byte (comparable "
                                   "across tokenizers). Whole responses, never truncated.")
    p.add_argument("model", help="a model folder or run directory")
    p.add_argument("--data", required=True, help="jsonl file with reference responses")
    p.add_argument("--max-examples", type=_positive_int, help="the first N examples only")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--out", help="also write the result to this json file")
    p.set_defaults(func=_cmd_likelihood)

    p = sub.add_parser("prune", help="keep some of a model's blocks and write it as a Hugging Face folder",
                       description="Depth pruning, the start of a prune-and-distill run: keep K evenly spaced "
                                   "blocks (first and last included) or the named ones, and write the smaller "
                                   "model with the source's tokenizer.")
    p.add_argument("model", help="a causal LM folder (safetensors)")
    p.add_argument("--out", required=True, help="the pruned model's folder (new, empty, or an earlier pruned model)")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it holds something else")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--keep", type=_positive_int, help="number of blocks to keep, evenly spaced")
    group.add_argument("--layers", help="comma-separated block indices to keep (from 0)")
    p.set_defaults(func=_cmd_prune)

    p = sub.add_parser("report", help="Markdown report with plots for one or more runs",
                       description="Loss curves, dev metric over steps and per-set test scores of runs side by side.")
    p.add_argument("runs", nargs="+", help="run directories (or evaluation folders)")
    p.add_argument("--out", default="report", help="output folder (default: ./report)")
    p.add_argument("--teacher", help="the teacher's run or evaluation folder (drawn hatched)")
    p.add_argument("--title", default="dualkd report")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("demo", help="the main job: a tiny teacher distilled into five students on CPU, evaluated",
                       description="Generate an instruction-following dataset, train a tiny teacher from scratch, "
                                   "train five smaller students (SFT, KD, DSKD with the teacher's tokenizer; SFT and "
                                   "DSKDv2-ETA with their own), evaluate all with 5 sampling seeds and write a "
                                   "report (about 5-10 minutes on 2 CPU cores).")
    p.add_argument("--output-dir", default="runs/demo", help="where the data, runs and report go (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a few steps and a small test set (a smoke test)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides written after an option (`train CFG --resume a.b=1 c=2`) are still overrides
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except DualKDError as e:
        print(f"dualkd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
