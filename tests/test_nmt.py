"""Encoder-decoder (translation) training: sentence-pair data, seq2seq batches, word-level KD, TIE-KD's ranking
loss and iterative KD, SeqKD with beam search; on tiny random Marian models and a tokenizer trained in the test."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dualkd.data.formats import parse_record
from dualkd.errors import DataError
from dualkd.train.build import build_parts
from dualkd.train.engine import LocalEngine
from dualkd.train.loop import train
from tests.helpers import nmt_run, read_metrics

ENGINE = LocalEngine()


def test_sentence_pairs_and_seq2seq_batches(tmp_path: Path, nmt_pairs: tuple[Path, Path], byte_tokenizer_dir: Path,
                                            nmt_teacher: Path) -> None:
    ex = parse_record({"de": "Ein Hund.", "en": "A dog."}, "f:1", translation=("de", "en"))
    assert (ex.prompt, ex.response) == ("Ein Hund.", "A dog.")
    with pytest.raises(DataError, match="f:2: field 'en' is missing"):
        parse_record({"de": "x"}, "f:2", translation=("de", "en"))
    parts = build_parts(nmt_run(tmp_path, nmt_pairs, byte_tokenizer_dir, {"name": "word_kd"}, teacher=nmt_teacher),
                        tmp_path, ENGINE)
    ds = parts.train_set
    batch = ds.collate([0, 1, 2])
    tokens, tok = batch.student, parts.student_tokenizer
    for b, i in enumerate([0, 1, 2]):
        x = ds.student[i]
        source, target = x.ids[: x.prompt_len], x.ids[x.prompt_len:]
        assert tokens.input_ids[b, : len(source)].tolist() == source and tokens.attention_mask[b].sum() == len(source)
        assert tokens.labels[b, : len(target)].tolist() == target and target[-1] == tok.eos_token_id
        assert int(tokens.loss_mask[b].sum()) == len(target)  # every target token + EOS, no pads
    start = parts.student.config.decoder_start_token_id
    decoder_in = parts.student.prepare_decoder_input_ids_from_labels(
        labels=tokens.labels.masked_fill(~tokens.loss_mask, -100))
    assert (decoder_in[:, 0] == start).all()
    assert torch.equal(decoder_in[:, 1:][tokens.loss_mask[:, 1:]], tokens.labels[:, :-1][tokens.loss_mask[:, 1:]])


@pytest.mark.parametrize("objective", [{"name": "word_kd", "divergence": "js"}, {"name": "tie_kd"},
                                       {"name": "kd", "ranking_top_k": 3, "fused": "off"}],
                         ids=["word_kd", "tie_kd", "kd_ranking"])
def test_translation_students_train(objective: dict, tmp_path: Path, nmt_pairs: tuple[Path, Path],
                                    byte_tokenizer_dir: Path, nmt_teacher: Path) -> None:
    records = read_metrics(train(nmt_run(tmp_path, nmt_pairs, byte_tokenizer_dir, objective, teacher=nmt_teacher)))
    assert len(records) == 6 and all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]


def test_seqkd_with_beams_then_bleu(tmp_path: Path, nmt_pairs: tuple[Path, Path], byte_tokenizer_dir: Path,
                                    nmt_teacher: Path) -> None:
    import json

    from dualkd.cli import main

    cfg = nmt_run(tmp_path / "seqkd", nmt_pairs, byte_tokenizer_dir, {"name": "sft"}, teacher=nmt_teacher,
               source={"kind": "seqkd"}, data={"max_examples": 24},
               generation={"do_sample": False, "num_beams": 3, "max_new_tokens": 12, "no_repeat_ngram_size": 0})
    run = train(cfg)
    made = [json.loads(line) for line in (run / "seqkd-train.jsonl").read_text().splitlines()]
    assert made and all(set(m) >= {"prompt", "output"} for m in made)
    out = tmp_path / "eval"
    assert main(["eval", str(run), str(nmt_pairs[1]), "--translation", "de:en", "--num-beams", "2",
                 "--max-new-tokens", "12", "--out", str(out)]) == 0
    scores = json.loads((out / "scores.json").read_text())["sets"]["dev"]["mean"]
    assert 0.0 <= scores["bleu"] <= 100.0


# ----------------------------------------------------------------------------------------------- CBMI


