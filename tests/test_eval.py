"""Evaluation: metrics against hand-computed cases and the reference libraries, generation, the harness end to
end on a tiny model (files, re-scoring, determinism), test-set resolution and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dualkd.config import GenerationConfig
from dualkd.errors import DataError
from dualkd.eval.metrics import bleu, chrf, exact_match, normalize_answer, rouge_l, score
from tests.helpers import write_jsonl

# ----------------------------------------------------------------------------------------------- metrics


def test_rouge_l_hand_computed() -> None:
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": 5 of 6 tokens each side
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(100 * 5 / 6)
    # rouge_score lowercases, drops punctuation, and stems (Porter): "Dogs running!" -> [dog, run], LCS with
    # [the, dog, run] is 2: P = 2/2, R = 2/3, F = 0.8; in the other order only one token is in sequence
    assert rouge_l("Dogs running!", ["the dog runs"]) == pytest.approx(80.0)
    assert rouge_l("Running dogs!", ["the dog runs"]) == pytest.approx(100 * 2 * (1 / 2 * 1 / 3) / (1 / 2 + 1 / 3))
    assert rouge_l("", ["anything"]) == 0.0


def test_rouge_l_is_rouge_score_max_over_references() -> None:
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    hyp = "A quick brown fox jumps over the lazy dog near the river bank."
    refs = ["The quick brown fox jumped over a lazy dog.", "Foxes are quick.", "a river bank with a dog"]
    expected = 100 * max(scorer.score(r, hyp)["rougeL"].fmeasure for r in refs)
    assert rouge_l(hyp, refs) == pytest.approx(expected)
    assert rouge_l(hyp, refs) > rouge_l(hyp, refs[1:])


def test_exact_match_normalizes_like_squad() -> None:
    assert normalize_answer("  The Cat,  sat!  ") == "cat sat"
    assert exact_match("The cat.", ["a cat"]) == 100.0
    assert exact_match("cats", ["cat", "dog"]) == 0.0
    assert exact_match("Dog", ["cat", "the dog"]) == 100.0


def test_bleu_and_chrf_match_sacrebleu() -> None:
    import sacrebleu

    hyps = ["A man in an orange hat looks at something.", "A dog runs on the grass."]
    refs = [["A man in an orange hat starring at something."], ["A Boston Terrier is running on lush grass.",
                                                                "A dog is running on the grass."]]
    streams = [[refs[0][0], refs[1][0]], [refs[0][0], refs[1][1]]]  # the first reference pads a short list
    assert bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score)
    assert chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, streams).score)
    assert bleu(["same words here and there"], [["same words here and there"]]) == pytest.approx(100.0)


def test_score_means_sentence_metrics_and_rejects_unknown() -> None:
    assert score("exact_match", ["a", "b"], [["a"], ["c"]]) == 50.0
    with pytest.raises(ValueError, match="unknown metric"):
        score("meteor", ["a"], [["a"]])
    with pytest.raises(ValueError, match="hypotheses"):
        score("rougeL", ["a"], [])


# ----------------------------------------------------------------------------------------------- test sets


def test_suite_reports_missing_sets_and_caps(tmp_path: Path) -> None:
    from dualkd.eval.suites import resolve_test_sets

    (tmp_path / "dolly").mkdir()
    write_jsonl(tmp_path / "dolly" / "test.jsonl", [{"prompt": f"Q{i}\n", "output": ["a", "b"]} for i in range(5)])
    sets, missing = resolve_test_sets(suite="dolly-protocol", data_dir=tmp_path, max_examples=3)
    assert [s.name for s in sets] == ["dolly"] and len(sets[0].examples) == 3
    assert set(missing) == {"self_inst", "vicuna", "sinst", "uinst"}
    assert str(tmp_path / "uinst" / "test.jsonl") in missing["uinst"]
    with pytest.raises(DataError, match="no test set"):
        resolve_test_sets(suite="dolly-protocol", data_dir=tmp_path / "dolly")
    with pytest.raises(DataError, match="needs --data-dir"):
        resolve_test_sets(suite="dolly-protocol")


def test_translation_pairs(tmp_path: Path) -> None:
    from dualkd.eval.suites import resolve_test_sets

    path = write_jsonl(tmp_path / "test_2016.jsonl", [{"de": "Ein Hund.", "en": "A dog."}, {"de": "Hallo", "en": "Hi"}])
    (s,), _ = resolve_test_sets([path], translation=("de", "en"))
    assert s.metrics == ("bleu", "chrf") and s.examples[0].prompt == "Ein Hund." and s.examples[1].references == ("Hi",)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"de": "Ein Hund."}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'en'"):
        resolve_test_sets([bad], translation=("de", "en"))


# ----------------------------------------------------------------------------------------------- harness


@pytest.fixture()
def test_file(tmp_path: Path) -> Path:
    from dualkd.data.synthetic import generate

    return write_jsonl(tmp_path / "tiny_test.jsonl", generate("instructions", 10, seed=4))


def test_generation_is_seeded_and_batch_independent(teacher_dir: Path, test_file: Path) -> None:
    from dualkd.eval.suites import resolve_test_sets
    from dualkd.generate import generate_responses, load_for_generation

    model, tok = load_for_generation(teacher_dir)
    (s,), _ = resolve_test_sets([test_file])
    settings = GenerationConfig(max_length=96, max_prompt_length=64, max_new_tokens=8, batch_size=4)
    a = generate_responses(model, tok, s.examples, settings, seed=10)
    b = generate_responses(model, tok, s.examples, settings, seed=10)
    c = generate_responses(model, tok, s.examples, settings, seed=20)
    assert a == b and a != c and len(a) == len(s.examples)
    greedy = settings.model_copy(update={"do_sample": False})
    one = generate_responses(model, tok, s.examples, greedy.model_copy(update={"batch_size": 1}))
    many = generate_responses(model, tok, s.examples, greedy.model_copy(update={"batch_size": 10}))
    assert one == many  # left padding does not change what a prompt produces


def test_eval_end_to_end_and_rescore(teacher_dir: Path, test_file: Path, tmp_path: Path) -> None:
    from rouge_score.rouge_scorer import RougeScorer

    from dualkd.cli import main

    out = tmp_path / "eval"
    assert main(["eval", str(teacher_dir), str(test_file), "--seeds", "10,20", "--max-new-tokens", "8",
                 "--max-length", "96", "--max-prompt-length", "64", "--out", str(out)]) == 0
    scores = json.loads((out / "scores.json").read_text())
    s = scores["sets"]["tiny_test"]
    assert scores["seeds"] == [10, 20] and s["n"] == 10 and set(s["per_seed"]) == {"10", "20"}
    assert scores["generation"]["no_repeat_ngram_size"] == 6
    # re-scoring the saved generations with rouge_score directly gives the reported numbers
    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    for seed in ("10", "20"):
        rows = [json.loads(x) for x in (out / "generations" / f"tiny_test.seed{seed}.jsonl").read_text().splitlines()]
        direct = sum(max(scorer.score(r, row["generation"])["rougeL"].fmeasure for r in row["references"])
                     for row in rows) / len(rows) * 100
        assert s["per_seed"][seed]["rougeL"] == pytest.approx(direct)
    from dualkd.eval.harness import rescore

    again = rescore(out)
    assert again["tiny_test"]["mean"] == pytest.approx(s["mean"])
    assert "| tiny_test | 10 |" in (out / "scores.md").read_text()
    assert main(["eval", "--rescore", str(out)]) == 0


def test_eval_greedy_runs_once_and_run_dirs_resolve(teacher_dir: Path, test_file: Path, tmp_path: Path) -> None:
    import shutil

    from dualkd.eval.harness import evaluate
    from dualkd.eval.suites import resolve_test_sets

    run = tmp_path / "run"
    shutil.copytree(teacher_dir, run / "final")
    sets, _ = resolve_test_sets([test_file], max_examples=4)
    result = evaluate(run, sets, GenerationConfig(do_sample=False, max_new_tokens=4, max_length=96,
                                                  max_prompt_length=64), progress=False)
    assert result["seeds"] == [0] and Path(result["out_dir"]) == run / "eval"
    assert result["sets"]["tiny_test"]["std"]["rougeL"] == 0.0


def test_eval_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dualkd.cli import main

    assert main(["eval", str(tmp_path), "--suite", "dolly-protocol", "--data-dir", str(tmp_path)]) == 2
    assert "no test set to evaluate" in capsys.readouterr().err
    (tmp_path / "x.jsonl").write_text('{"prompt": "a", "output": "b"}\n')
    assert main(["eval", str(tmp_path / "nothing"), str(tmp_path / "x.jsonl")]) == 2
    assert "no model here" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- report


def test_report_side_by_side(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path, teacher_dir: Path,
                             test_file: Path) -> None:
    from dualkd.config import validate_config
    from dualkd.eval.harness import evaluate
    from dualkd.eval.suites import resolve_test_sets
    from dualkd.report import report
    from dualkd.train.loop import train
    from tests.helpers import tiny_run

    runs = []
    for name, teacher in (("sft", None), ("kd", teacher_dir)):
        cfg = tiny_run(tmp_path / name, train_file, byte_tokenizer_dir, teacher=teacher,
                       data={"dev": str(train_file), "dev_max_examples": 8}, eval={"every_steps": 4})
        runs.append(train(validate_config(cfg)))
    sets, _ = resolve_test_sets([test_file], max_examples=4)
    settings = GenerationConfig(max_new_tokens=4, max_length=96, max_prompt_length=64)
    for run in runs:
        evaluate(run, sets, settings, seeds=[10, 20], progress=False)
    md = report(runs, tmp_path / "report", title="side by side")
    text = md.read_text()
    assert text.startswith("# side by side") and "| sft (" not in text
    assert "| sft | sft | 12 |" in text and "| kd | kd | 12 |" in text
    assert "| model | rougeL | exact_match |" in text
    for png in ("loss.png", "dev.png", "scores.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000 and f"]({png})" in text
    with pytest.raises(DataError, match="neither metrics.jsonl"):
        report([tmp_path], tmp_path / "r2")
    # a trained run without an evaluation is named in the scores table, not dropped
    unevaluated = train(validate_config(tiny_run(tmp_path / "plain", train_file, byte_tokenizer_dir,
                                                 optimization={"max_steps": 2})))
    text = report([*runs, unevaluated], tmp_path / "r3").read_text()
    assert "| plain (not evaluated: run `dualkd eval` on it) | – | – |" in text


def test_sampling_leaves_training_state_untouched(teacher_dir: Path) -> None:
    """On-policy sampling inside a training step: train/eval flags, the global RNG stream and autograd are as
    before, and the same seed gives the same samples."""
    import torch

    from dualkd.generate import load_for_generation, sample_token_ids

    model, tok = load_for_generation(teacher_dir)
    model.train()
    model.transformer.h[0].eval()  # a mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    prompts = [tok("a b c", add_special_tokens=False)["input_ids"], tok("hello", add_special_tokens=False)["input_ids"]]
    settings = GenerationConfig(max_new_tokens=6, max_length=96, max_prompt_length=64)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = sample_token_ids(model, prompts, settings, tok.eos_token_id, tok.eos_token_id, seed=7)
    assert torch.equal(torch.rand(4), expected)  # the caller's RNG stream did not move
    assert [m.training for m in model.modules()] == flags
    assert torch.is_grad_enabled()
    assert sample_token_ids(model, prompts, settings, tok.eos_token_id, tok.eos_token_id, seed=7) == first
    assert all(len(x) <= 6 for x in first)


def test_seqkd_generate_then_train(teacher_dir: Path, train_file: Path, byte_tokenizer_dir: Path,
                                   tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Sequence-level KD as two commands: the teacher answers the training prompts, the student trains on them."""
    from dualkd.cli import main
    from dualkd.config import validate_config
    from dualkd.train.loop import train
    from tests.helpers import read_metrics, tiny_run

    out = tmp_path / "teacher_outputs.jsonl"
    assert main(["generate", str(teacher_dir), "--data", str(train_file), "--out", str(out), "--max-examples", "24",
                 "--max-new-tokens", "6", "--max-length", "96", "--max-prompt-length", "64"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    source = [json.loads(line) for line in train_file.read_text().splitlines()][:24]
    assert 0 < len(rows) <= 24 and all(r["output"].strip() for r in rows)
    by_prompt = {s["prompt"]: s for s in source}
    assert all(r["prompt"] in by_prompt and r["references"] == [by_prompt[r["prompt"]]["output"]] for r in rows)
    assert f"{len(rows)} examples" in capsys.readouterr().out
    run = train(validate_config(tiny_run(tmp_path / "seqkd", out, byte_tokenizer_dir,
                                         optimization={"max_steps": 4, "micro_batch_size": 4})))
    assert len(read_metrics(run)) == 4 and (run / "final" / "model.safetensors").exists()


def test_generated_chat_records_keep_the_conversation(tmp_path: Path) -> None:
    from dualkd.data.formats import parse_record
    from dualkd.generate import write_generated_dataset

    chat = parse_record({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
                        "x:1")
    text = parse_record({"prompt": "Q\n", "output": ["A", "B"]}, "x:2")
    path = tmp_path / "gen.jsonl"
    assert write_generated_dataset([chat, text, text], ["Hello!", "C", "  "], path) == (2, 1)
    first, second = (json.loads(x) for x in path.read_text().splitlines())
    assert first["messages"][-1] == {"role": "assistant", "content": "Hello!"}
    assert first["messages"][0]["content"] == "Hi"
    assert second["output"] == "C" and second["references"] == ["A", "B"]


def test_translation_eval_with_an_encoder_decoder(tmp_path: Path, byte_tokenizer_dir: Path) -> None:
    """BLEU/chrF on a {"de", "en"} file with a (tiny, random) seq2seq model: sources right-padded into the
    encoder, beam search, the decoder start token not counted as output."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from dualkd.cli import main

    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    config = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=2,
                      pad_token_id=pad, eos_token_id=tok.eos_token_id, decoder_start_token_id=pad)
    model_dir = tmp_path / "t5"
    T5ForConditionalGeneration(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    test = write_jsonl(tmp_path / "test_2016.jsonl", [{"de": "Ein Hund läuft.", "en": "A dog runs."},
                                                      {"de": "Zwei Männer.", "en": "Two men."}])
    out = tmp_path / "eval"
    assert main(["eval", str(model_dir), str(test), "--translation", "de:en", "--num-beams", "2",
                 "--max-new-tokens", "5", "--out", str(out)]) == 0
    scores = json.loads((out / "scores.json").read_text())
    s = scores["sets"]["test_2016"]
    assert s["metrics"] == ["bleu", "chrf"] and scores["seeds"] == [0]  # beams: one deterministic run
    assert 0.0 <= s["mean"]["bleu"] <= 100.0 and 0.0 <= s["mean"]["chrf"] <= 100.0
    rows = [json.loads(x) for x in (out / "generations" / "test_2016.seed0.jsonl").read_text().splitlines()]
    assert [r["references"] for r in rows] == [["A dog runs."], ["Two men."]]
