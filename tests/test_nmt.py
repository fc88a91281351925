"""Encoder-decoder (translation) training: sentence-pair data, seq2seq batches, word-level KD, TIE-KD's ranking
loss and iterative KD, SeqKD with beam search; on tiny random Marian models and a tokenizer trained in the test."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dualkd.config import validate_config
from dualkd.data.formats import parse_record
from dualkd.errors import DataError
from dualkd.lm import lm_forward
from dualkd.losses.ranking import hierarchical_ranking_loss
from dualkd.methods.base import StepNorm
from dualkd.methods.tie_kd import next_decoder_inputs
from dualkd.train.build import build_parts
from dualkd.train.engine import LocalEngine
from dualkd.train.loop import train
from tests.conftest import read_metrics, synthetic_records, write_jsonl

ENGINE = LocalEngine()
MARIAN = {"model_type": "marian", "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
          "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
          "max_position_embeddings": 128, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    recs = synthetic_records(120, seed=8)
    rows = [{"de": r["prompt"][-50:], "en": r["output"]} for r in recs]
    root = tmp_path_factory.mktemp("mt")
    return write_jsonl(root / "train.jsonl", rows[:96]), write_jsonl(root / "dev.jsonl", rows[96:])


def _run(out: Path, pairs: tuple[Path, Path], tok: Path, objective: dict, teacher: Path | None = None, **extra):
    cfg = {"output_dir": str(out), "seed": 3,
           "student": {"init": "random", "tokenizer": str(tok), "arch": dict(MARIAN)},
           "data": {"train": str(pairs[0]), "dev": str(pairs[1]), "translation": "de:en", "max_length": 48,
                    "max_prompt_length": 48},
           "objective": objective, "optimization": {"lr": 3e-3, "max_steps": 6, "micro_batch_size": 8},
           "eval": {"every_steps": 3}, "checkpoint": {"every_steps": 1000},
           "logging": {"tensorboard": False, "progress_bar": "off"}}
    if teacher is not None:
        cfg["teacher"] = {"path": str(teacher)}
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_config(cfg)


@pytest.fixture(scope="module")
def nmt_teacher(tmp_path_factory: pytest.TempPathFactory, pairs: tuple[Path, Path], byte_tokenizer_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("nmt_teacher")
    cfg = _run(out, pairs, byte_tokenizer_dir, {"name": "sft"}, optimization={"max_steps": 60, "lr": 5e-3},
               student={"arch": {**MARIAN, "d_model": 48, "encoder_ffn_dim": 96, "decoder_ffn_dim": 96}})
    return train(cfg) / "final"


def test_sentence_pairs_and_seq2seq_batches(tmp_path: Path, pairs: tuple[Path, Path], byte_tokenizer_dir: Path,
                                            nmt_teacher: Path) -> None:
    ex = parse_record({"de": "Ein Hund.", "en": "A dog."}, "f:1", translation=("de", "en"))
    assert (ex.prompt, ex.response) == ("Ein Hund.", "A dog.")
    with pytest.raises(DataError, match="f:2: field 'en' is missing"):
        parse_record({"de": "x"}, "f:2", translation=("de", "en"))
    parts = build_parts(_run(tmp_path, pairs, byte_tokenizer_dir, {"name": "word_kd"}, teacher=nmt_teacher),
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


def test_ranking_loss_hand_cases() -> None:
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.5, 0.2, 0.15, 0.05])
    # T = (0, 1, 2), S = (1, 2, 3); top-1: (0.5 − 0.1) + (0.2 − 0.1) = 0.5; top-k: only t_1 (p 0.4) is outranked,
    # by s = 1, 2, 3: (0.5 − 0.1) + (0.2 − 0.1) + (0.15 − 0.1) = 0.55
    assert float(hierarchical_ranking_loss(q.log(), p.log(), k=3)) == pytest.approx(1.05, abs=1e-6)
    # k = 1: T = (0,), S = (1,): no top-1 term; the student's top token (teacher p 0.3 < 0.4) outranks t_1 by 0.4
    assert float(hierarchical_ranking_loss(q.log(), p.log(), k=1)) == pytest.approx(0.4, abs=1e-6)
    z = torch.randn(4, 7, 30)
    assert float(hierarchical_ranking_loss(z, z, k=5).abs().max()) == pytest.approx(0.0, abs=1e-7)
    assert float(hierarchical_ranking_loss(2.5 * z, z, k=5).abs().max()) == pytest.approx(0.0, abs=1e-7)  # same order
    assert float(hierarchical_ranking_loss(-z, z, k=5).min()) > 0
    with pytest.raises(ValueError, match="k must be"):
        hierarchical_ranking_loss(z, z, k=31)


def test_iterative_kd_inputs_gradients_and_pads(tmp_path: Path, pairs: tuple[Path, Path], byte_tokenizer_dir: Path,
                                                 nmt_teacher: Path) -> None:
    logits = torch.randn(2, 5, 11)
    assert torch.equal(next_decoder_inputs(logits, 7), torch.cat([torch.full((2, 1), 7), logits.argmax(-1)[:, :-1]], 1))

    parts = build_parts(_run(tmp_path, pairs, byte_tokenizer_dir, {"name": "tie_kd", "iterations": 3},
                             teacher=nmt_teacher), tmp_path, ENGINE)
    student, obj = parts.student, parts.objective
    student.eval()  # no dropout: passes are comparable
    seen: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    hook = student.model.decoder.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True)
    out_hook = student.register_forward_hook(lambda m, a, out: outputs.append(out.logits.detach()))
    batch = parts.train_set.collate([0, 1, 2, 3])
    norm = StepNorm({"tokens": float(batch.student.loss_mask.sum())})
    loss, metrics = obj(student, batch, obj.teacher_forward(parts.teacher, batch), norm)
    hook.remove()
    out_hook.remove()
    assert len(seen) == 3
    start = student.config.decoder_start_token_id
    assert torch.equal(seen[1], next_decoder_inputs(outputs[0], start))  # pass 2 reads pass 1's argmax
    assert torch.equal(seen[2], next_decoder_inputs(outputs[1], start))
    loss.backward()
    assert all(p.grad is None for p in parts.teacher.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert math.isfinite(float(metrics["ranking"])) and float(metrics["kd"]) >= 0

    # pads count nowhere: the summed loss of a batch is the sum over its examples alone
    def summed(indices: list[int]) -> float:
        b = parts.train_set.collate(indices)
        n = float(b.student.loss_mask.sum())
        value, _ = obj(student, b, obj.teacher_forward(parts.teacher, b), StepNorm({"tokens": n}))
        return float(value.detach()) * n

    assert summed([0, 5]) == pytest.approx(summed([0]) + summed([5]), rel=1e-4)


@pytest.mark.parametrize("objective", [{"name": "word_kd", "divergence": "js"}, {"name": "tie_kd"},
                                       {"name": "kd", "ranking_top_k": 3, "fused": "off"}],
                         ids=["word_kd", "tie_kd", "kd_ranking"])
def test_translation_students_train(objective: dict, tmp_path: Path, pairs: tuple[Path, Path],
                                    byte_tokenizer_dir: Path, nmt_teacher: Path) -> None:
    records = read_metrics(train(_run(tmp_path, pairs, byte_tokenizer_dir, objective, teacher=nmt_teacher)))
    assert len(records) == 6 and all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]


def test_seqkd_with_beams_then_bleu(tmp_path: Path, pairs: tuple[Path, Path], byte_tokenizer_dir: Path,
                                    nmt_teacher: Path) -> None:
    import json

    from dualkd.cli import main

    cfg = _run(tmp_path / "seqkd", pairs, byte_tokenizer_dir, {"name": "sft"}, teacher=nmt_teacher,
               source={"kind": "seqkd"}, data={"max_examples": 24},
               generation={"do_sample": False, "num_beams": 3, "max_new_tokens": 12, "no_repeat_ngram_size": 0})
    run = train(cfg)
    made = [json.loads(line) for line in (run / "seqkd-train.jsonl").read_text().splitlines()]
    assert made and all(set(m) >= {"prompt", "output"} for m in made)
    out = tmp_path / "eval"
    assert main(["eval", str(run), str(pairs[1]), "--translation", "de:en", "--num-beams", "2",
                 "--max-new-tokens", "12", "--out", str(out)]) == 0
    scores = json.loads((out / "scores.json").read_text())["sets"]["dev"]["mean"]
    assert 0.0 <= scores["bleu"] <= 100.0


# ----------------------------------------------------------------------------------------------- CBMI


def test_cbmi_weights() -> None:
    from dualkd.methods.cbmi import cbmi_weights

    g = torch.Generator().manual_seed(0)
    c = torch.randn(4, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]).bool()
    w = cbmi_weights(c, mask, 0.1, 0.3)
    assert bool((w >= 0).all()) and not w.requires_grad and torch.isfinite(w).all()  # one-token row: no NaN
    assert bool((w[~mask] == 0).all())
    # the normalized CBMI has mean 0 in each sentence: with λ_sent = 0 the token weights average to 1
    w_tok = cbmi_weights(c, mask, 0.1, 0.0)
    assert torch.allclose((w_tok * mask).sum(-1) / mask.sum(-1), torch.ones(4), atol=1e-5)
    assert torch.equal(cbmi_weights(c, mask, 0.0, 0.0), mask.float())  # λ = 0: plain CE
    # compat: the official denominators (padded length T = 6, no ε) on a hand-checked row and the batch
    row = torch.tensor([[1.0, 2.0, 4.0, 0.0, 0.0, 0.0]])
    mask_row = torch.tensor([[1, 1, 1, 0, 0, 0]]).bool()
    two = torch.cat([row, torch.tensor([[3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])])
    two_mask = torch.cat([mask_row, torch.ones(1, 6, dtype=torch.bool)])
    w_c = cbmi_weights(two, two_mask, 1.0, 1.0, compat=True)
    mu, sigma = 7 / 3, (((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 6) ** 0.5
    mu_b = (7 / 3 + 3) / 2
    sigma_b = (((7 / 3 - mu_b) ** 2 + (3 - mu_b) ** 2) / 6) ** 0.5
    expected = max(0.0, 1 + (1 - mu) / sigma) * max(0.0, 1 + (7 / 3 - mu_b) / sigma_b)
    assert float(w_c[0, 0]) == pytest.approx(expected, rel=1e-5)
    one = cbmi_weights(torch.tensor([[2.0, 0.0]]), torch.tensor([[True, False]]), 0.1, 0.3, compat=True)
    assert torch.isnan(one).any()  # what the official code does on a one-token sentence


def test_cbmi_switch_and_frozen_lm(tmp_path: Path, pairs: tuple[Path, Path], byte_tokenizer_dir: Path) -> None:
    cfg = _run(tmp_path / "cbmi", pairs, byte_tokenizer_dir, {"name": "cbmi", "pretrain_steps": 3},
               optimization={"max_steps": 6})
    parts = build_parts(cfg, tmp_path, ENGINE)
    obj, student = parts.objective, parts.student
    batch = parts.train_set.collate([0, 1, 2])
    n = float(batch.student.loss_mask.sum())
    for step, weighted in ((0, False), (2, False), (3, True), (5, True)):
        obj.zero_grad(set_to_none=True)
        student.zero_grad(set_to_none=True)
        loss, metrics = obj(student, batch, None, StepNorm({"tokens": n}, step=step))
        loss.backward()
        lm_grads = [p.grad for p in obj.lm.parameters()]
        assert float(metrics["weighting"]) == pytest.approx(float(weighted))
        if not weighted:
            assert float(metrics["weight"]) == pytest.approx(1.0)  # w = 1 before the switch
        assert all(g is None for g in lm_grads) == weighted  # the LM is frozen after it
        assert any(p.grad is not None for p in student.parameters())
    # λ = 0 and before the switch: label-smoothed CE of the NMT model + 0.01 x the LM's
    from dualkd.lm import lm_forward
    from dualkd.losses.cross_entropy import label_smoothed_cross_entropy

    student.eval()
    obj.lm.eval()
    loss, _ = obj(student, batch, None, StepNorm({"tokens": n}, step=0))
    tokens = batch.student
    nmt = label_smoothed_cross_entropy(lm_forward(student, tokens).logits, tokens.labels, tokens.loss_mask, 0.1)
    dec = student.prepare_decoder_input_ids_from_labels(labels=tokens.labels.masked_fill(~tokens.loss_mask, -100))
    lm = label_smoothed_cross_entropy(obj.lm(input_ids=dec).logits, tokens.labels, tokens.loss_mask, 0.1)
    assert float(loss.detach()) == pytest.approx(float((nmt.sum() + 0.01 * lm.sum()).detach() / n), rel=1e-5)
    records = read_metrics(train(cfg))  # and the whole run, with the switch at step 3
    assert len(records) == 6 and all(math.isfinite(r["loss"]) for r in records)
    assert [r["weighting"] for r in records] == pytest.approx([0.0] * 3 + [1.0] * 3)


def test_sft_label_smoothing_is_fairseqs(tmp_path: Path, pairs: tuple[Path, Path], byte_tokenizer_dir: Path) -> None:
    """The Transformer baseline's loss: (1 − ε)·NLL + ε·mean_v(−log q_v) per target token; `ce` stays the NLL."""
    parts = build_parts(_run(tmp_path, pairs, byte_tokenizer_dir, {"name": "sft", "label_smoothing": 0.1}),
                        tmp_path, ENGINE)
    student, obj = parts.student, parts.objective
    student.eval()
    batch = parts.train_set.collate([0, 1, 2])
    n = float(batch.student.loss_mask.sum())
    loss, metrics = obj(student, batch, None, StepNorm({"tokens": n}))
    tokens = batch.student
    logq = torch.log_softmax(lm_forward(student, tokens).logits.double(), -1)  # the same encoder-decoder call
    mask = tokens.loss_mask
    nll = -logq.gather(-1, tokens.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]
    smooth = -logq.mean(-1)[mask]
    assert float(loss) == pytest.approx(float((0.9 * nll + 0.1 * smooth).sum() / n), rel=1e-5)
    assert float(metrics["ce"]) == pytest.approx(float(nll.sum() / n), rel=1e-5)
