"""On-policy and sequence-level sources: student samples as examples (text kept exactly across tokenizers),
the mixing ratio, the loss of a sampled step, DistiLLM's replay buffer, SeqKD, and exact resume."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from dualkd.config import validate_config
from dualkd.data.dataset import TokenizedDataset
from dualkd.errors import ConfigError
from dualkd.train.engine import LocalEngine
from dualkd.train.loop import train
from dualkd.train.on_policy import OnPolicySource, ReplaySource, draw
from dualkd.train.rollouts import Rollout, Rollouts, decode_with_offsets
from dualkd.train.samplers import Sample
from tests.helpers import make_model_dir, needs_real_models, read_metrics, tiny_run

TEXTS = ["Hello world, naïve café", "Line one\nline two\ttab  and  spaces", "東京 ✓ — done.", "x", ""]


# ----------------------------------------------------------------------------------------------- bytes -> text


def test_decode_with_offsets_hand_cases() -> None:
    assert decode_with_offsets([b"ab", b" c", None, b"d"]) == ("ab cd", [(0, 2), (2, 4), (4, 4), (4, 5)])
    # "é" = C3 A9 split over two tokens: both share the character's span
    text, spans = decode_with_offsets([b"caf\xc3", b"\xa9", b"!"])
    assert text == "café!" and spans == [(0, 4), (3, 4), (4, 5)]
    # stray bytes become U+FFFD, one per byte, and keep their own spans
    text, spans = decode_with_offsets([b"a\xff", b"\xc3", b"b"])
    assert text == "a\ufffd\ufffdb" and spans == [(0, 2), (2, 3), (3, 4)]
    assert decode_with_offsets([]) == ("", [])


# ----------------------------------------------------------------------------------------------- rollouts


def _dataset(student_tok, teacher_tok, prompt: str = "Q: say it\nA:") -> TokenizedDataset:
    from dualkd.data.dataset import TruncationRules, tokenize_examples
    from dualkd.data.formats import Example

    ex = [Example(where="t:1", prompt=prompt, references=("gold",))]
    rules = TruncationRules(max_length=256, max_prompt_length=128)
    s = tokenize_examples(ex, student_tok, rules)
    t = tokenize_examples(ex, teacher_tok, rules) if teacher_tok is not None else None
    return TokenizedDataset(ex, s, t, student_tok.eos_token_id, teacher_tok.eos_token_id if teacher_tok else None)


def _check_text_survives(student_tok, teacher_tok) -> None:
    from dualkd.align.pairs import ExactAligner

    ds = _dataset(student_tok, teacher_tok)
    rollouts = Rollouts(ds, sampler=None, student_tokenizer=student_tok, teacher_tokenizer=teacher_tok,
                        aligner=ExactAligner(student_tok, teacher_tok))
    for text in TEXTS:
        ids = student_tok(text, add_special_tokens=False)["input_ids"]
        (r,) = rollouts.from_samples([0], [Sample(ids=ids, ended=True)])
        s, t = r.student, r.teacher
        prompt_s, prompt_t = s.text[: s.prompt_chars], t.text[: t.prompt_chars]
        assert s.text[s.prompt_chars:] == text == t.text[t.prompt_chars:]
        assert s.ids[s.prompt_len:-1] == ids and s.ids[-1] == student_tok.eos_token_id
        assert t.ids[-1] == teacher_tok.eos_token_id
        decode = (lambda tok, x: tok.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False))
        assert decode(teacher_tok, t.ids[t.prompt_len:]).strip() == text.strip()
        assert decode(student_tok, s.ids[s.prompt_len:]).strip() == text.strip()
        # every token's span covers exactly its text (ETA's input)
        for x, prompt in ((s, prompt_s), (t, prompt_t)):
            for k in range(x.prompt_len, len(x.ids) - 1):
                a, b = x.offsets[k]
                assert len(prompt) <= a <= b <= len(x.text)
        # aligned pairs read the same characters on both sides
        sp, tp = r.pairs
        for i, j in zip(sp[:-1], tp[:-1]):
            assert s.offsets[i + 1] == tuple(np.asarray(t.offsets[j + 1]) - t.prompt_chars + s.prompt_chars)
        assert len(sp) > 0


def test_sampled_text_survives_retokenization(byte_tokenizer_dir: Path, meta_tokenizer_dir: Path) -> None:
    byte_tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    meta_tok = AutoTokenizer.from_pretrained(meta_tokenizer_dir)
    _check_text_survives(byte_tok, meta_tok)  # byte-level student, SentencePiece-style teacher
    _check_text_survives(meta_tok, byte_tok)  # and the other way round (the student's leading ▁ is no text)


@pytest.mark.slow
def test_sampled_text_survives_retokenization_real_tokenizers() -> None:
    root = needs_real_models()
    smol = AutoTokenizer.from_pretrained(root / "smollm2-135m-instruct")
    gemma = AutoTokenizer.from_pretrained(root / "gemma-3-270m")
    _check_text_survives(smol, gemma)
    _check_text_survives(gemma, smol)


def test_rollout_without_eos_and_json_round_trip(byte_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    ds = _dataset(tok, None)
    rollouts = Rollouts(ds, sampler=None, student_tokenizer=tok)
    ids = tok("cut short", add_special_tokens=False)["input_ids"]
    (r,) = rollouts.from_samples([0], [Sample(ids=ids, ended=False)])
    assert r.student.ids[r.student.prompt_len:] == ids and r.teacher is None  # no EOS: the budget cut it
    back = Rollout.from_json(r.to_json())
    assert back.student == r.student and back.index == 0
    batch = rollouts.collate([r, back])
    assert batch.teacher is None
    assert int(batch.student.loss_mask.sum()) == 2 * len(ids)


# ----------------------------------------------------------------------------------------------- mixing


class _Gold:
    """Stands in for OffPolicySource in the schedule tests."""

    rank, steps_per_epoch = 0, 10


def test_mixing_ratio_is_honoured() -> None:
    for ratio in (0.0, 0.3, 0.5, 1.0):
        source = OnPolicySource(_Gold(), rollouts=None, ratio=ratio, start_step=100, seed=3)  # type: ignore[arg-type]
        assert not any(source.is_sampled_step(s) for s in range(100))  # the off-policy warm-up
        n = 4000
        hits = sum(source.is_sampled_step(s) for s in range(100, 100 + n))
        sd = math.sqrt(n * ratio * (1 - ratio))
        assert abs(hits - n * ratio) <= 4 * sd + 1e-9, (ratio, hits)
    # the draw depends only on (seed, step): every process and a resumed run agree
    assert draw(3, 57, "on_policy") == draw(3, 57, "on_policy") != draw(4, 57, "on_policy")


def test_replay_threshold_adapts_to_the_dev_loss() -> None:
    source = ReplaySource(_Gold(), rollouts=None, seed=0, total_steps=100, capacity=8,  # type: ignore[arg-type]
                          init_threshold=0.0, threshold_step=0.1, loss_eps=0.1, schedule="decreasing")
    assert all(source.choose(s) == "gold" for s in range(50))  # φ = 0: the dataset only
    source.observe_dev_loss(2.0)  # the starting point
    source.observe_dev_loss(2.05)  # worse, but by less than ε
    assert source.threshold == 0.0
    source.observe_dev_loss(2.1)
    assert source.threshold == pytest.approx(0.1) and source.last_dev_loss == 2.1
    source.observe_dev_loss(1.5)  # better: no change, and the reference stays at the last raise
    assert source.threshold == pytest.approx(0.1) and source.last_dev_loss == 2.1
    for loss in (2.3, 2.5, 2.7, 2.9, 3.1, 3.3, 3.5, 3.7, 3.9, 4.1, 4.3):
        source.observe_dev_loss(loss)
    assert source.threshold == 1.0  # capped
    # φ = 1 with an empty buffer: fresh samples until the buffer is full, then fresh with p = 1 - t/T, else replay
    assert all(source.choose(s) == "fresh" for s in range(100))
    source.buffer.extend([None] * 8)  # type: ignore[list-item]
    kinds = [source.choose(s) for s in range(100)]
    assert set(kinds) == {"fresh", "replay"}
    early, late = kinds[:30].count("fresh"), kinds[70:].count("fresh")
    assert early > late  # the decreasing schedule
    assert source.fresh_probability(0) == 1.0 and source.fresh_probability(100) == 0.0


# ----------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def cross_teacher(tmp_path_factory: pytest.TempPathFactory, meta_tokenizer_dir: Path) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("op_cross_teacher"), meta_tokenizer_dir, model_type="llama",
                          hidden_size=48, intermediate_size=96, seed=2)


OBJECTIVES = {
    "kd": ({"name": "kd", "temperature": 2.0}, "same"),
    "dskd": ({"name": "dskd"}, "same"),
    "dskd_cma": ({"name": "dskd_cma"}, "cross"),
    "dskdv2_eta": ({"name": "dskdv2", "pinv_init": True}, "cross"),
    "dskdv2_cma": ({"name": "dskdv2", "alignment": "cma"}, "cross"),
    "uld": ({"name": "uld"}, "cross"),
    "mined": ({"name": "mined"}, "cross"),
}
ON_POLICY = {"kind": "on_policy", "student_gen_ratio": 0.5, "on_policy_after": 2, "on_policy_after_unit": "steps",
             "max_new_tokens": 24}


@pytest.mark.parametrize("case", sorted(OBJECTIVES))
def test_tiny_on_policy_run(case: str, tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                            teacher_dir: Path, cross_teacher: Path) -> None:
    objective, kind = OBJECTIVES[case]
    teacher = teacher_dir if kind == "same" else cross_teacher
    cfg = tiny_run(tmp_path / case, train_file, byte_tokenizer_dir, teacher=teacher, objective=objective,
                   source=ON_POLICY, optimization={"max_steps": 8})
    records = read_metrics(train(validate_config(cfg)))
    sampled = [r for r in records if r["sampled"]]
    assert [r["sampled"] for r in records[:2]] == [0.0, 0.0]  # the warm-up steps
    assert sampled and len(sampled) < len(records)
    for r in records:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
    for r in sampled:  # the gold CE is still trained and logged
        assert r["sampled_tokens"] > 0 and r["ce"] > 0


def test_sampled_step_trains_the_gold_ce_and_not_the_samples_ce(tmp_path: Path, train_file: Path,
                                                                 byte_tokenizer_dir: Path, teacher_dir: Path) -> None:
    """With kd_rate 0 a sampled step's loss is the gold CE alone, normalized by the gold tokens (the samples'
    CE is not trained): the logged loss of step 1 equals the CE of the initial student on step 1's gold
    examples, computed here with plain torch."""

    from dualkd.train.build import build_parts
    from dualkd.train.sources import OffPolicySource

    cfg = tiny_run(tmp_path / "kd", train_file, byte_tokenizer_dir, teacher=teacher_dir,
                   objective={"name": "kd", "kd_rate": 0.0}, optimization={"max_steps": 1, "grad_accum": 2},
                   source={**ON_POLICY, "on_policy_after": 0, "student_gen_ratio": 1.0})
    cfg["student"]["arch"].update({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    (record,) = read_metrics(train(validate_config(cfg)))
    assert record["sampled"] == 1.0 and record["sampled_tokens"] > 0
    run = validate_config(cfg)
    parts = build_parts(run, tmp_path / "twin", LocalEngine())
    order = OffPolicySource(parts.train_set, 4, 2, 1, 0, run.seed, run.data.bucket_by_length).epoch_order(0)
    gold = parts.train_set.collate(order[0])
    with torch.no_grad():
        logits = parts.student(input_ids=gold.student.input_ids, attention_mask=gold.student.attention_mask).logits
    m = gold.student.loss_mask
    ce = -torch.log_softmax(logits[m].double(), -1).gather(-1, gold.student.labels[m][:, None]).sum() / m.sum()
    assert record["loss"] == pytest.approx(float(ce), rel=1e-5)


def test_gold_ce_is_the_objectives_own_ce_term(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                                              teacher_dir: Path) -> None:
    """Naive twin: objective(gold) - objective(gold, ce_weight 0) == the gold CE the loop adds on a sampled
    step (TrainModule with `gold`), for the fused CE."""
    from dataclasses import replace

    from dualkd.methods.base import StepNorm
    from dualkd.train.build import build_parts
    from dualkd.train.step import TrainModule

    cfg = validate_config(tiny_run(tmp_path / "kd", train_file, byte_tokenizer_dir, teacher=teacher_dir,
                                   objective={"name": "kd", "kd_rate": 0.4}))
    parts = build_parts(cfg, tmp_path / "kd", LocalEngine())
    parts.student.eval()
    batch = parts.train_set.collate(list(range(5)))
    t_out = parts.objective.teacher_forward(parts.teacher, batch)
    norm = StepNorm({"tokens": float(batch.student.loss_mask.sum())})
    full, _ = parts.objective(parts.student, batch, t_out, norm)
    sampled_norm = replace(norm, ce_weight=0.0)
    kd_only, _ = parts.objective(parts.student, batch, t_out, sampled_norm)
    with_gold, metrics = TrainModule(parts.student, parts.objective)(batch, t_out, sampled_norm, batch, norm)
    ce = with_gold - kd_only
    assert float((full - kd_only).detach()) == pytest.approx(float(ce.detach()), rel=1e-5)
    assert float(metrics["ce"]) * 0.6 == pytest.approx(float(ce.detach()), rel=1e-5)


def test_replay_run_fills_and_reuses_its_buffer(tmp_path: Path, train_file: Path, dev_file: Path,
                                                byte_tokenizer_dir: Path, cross_teacher: Path) -> None:
    cfg = tiny_run(tmp_path / "replay", train_file, byte_tokenizer_dir, teacher=cross_teacher,
                   objective={"name": "dskdv2"}, data={"dev": str(dev_file)}, eval={"every_steps": 3},
                   optimization={"max_steps": 12},
                   source={"kind": "replay", "replay_init_threshold": 0.8, "replay_capacity": 8,
                           "max_new_tokens": 16})
    run = train(validate_config(cfg))
    records = read_metrics(run)
    kinds = [("replay" if r["replayed"] else "fresh") if r["sampled"] else "gold" for r in records]
    assert "fresh" in kinds and "replay" in kinds
    assert kinds.index("fresh") < kinds.index("replay")  # the buffer fills before it is reused
    dev = read_metrics(run, "dev")
    assert [d["step"] for d in dev] == [3, 6, 9, 12]


def test_on_policy_needs_a_distillation_objective(tmp_path: Path, train_file: Path,
                                                  byte_tokenizer_dir: Path) -> None:
    cfg = tiny_run(tmp_path / "sft", train_file, byte_tokenizer_dir, source={"kind": "on_policy"})
    with pytest.raises(ConfigError, match="has none"):
        train(validate_config(cfg))
    with pytest.raises(ConfigError, match="data.dev"):
        validate_config(tiny_run(tmp_path / "r", train_file, byte_tokenizer_dir, source={"kind": "replay"}))


def test_vllm_backend_explains_what_is_missing() -> None:
    from dualkd.train.samplers import check_vllm_available

    with pytest.raises(ConfigError, match="source.backend=hf"):
        check_vllm_available()  # this machine has neither vLLM nor a GPU


@pytest.mark.parametrize("kind", ["on_policy", "replay"])
def test_resume_reproduces_a_sampling_run(kind: str, tmp_path: Path, train_file: Path, dev_file: Path,
                                          byte_tokenizer_dir: Path, cross_teacher: Path) -> None:
    """Sampling seeds follow the step and the replay buffer is in the checkpoint: resuming from step 4 gives the
    uninterrupted run's losses exactly."""
    source = dict(ON_POLICY, on_policy_after=1) if kind == "on_policy" else {
        "kind": "replay", "replay_init_threshold": 0.9, "replay_capacity": 8, "max_new_tokens": 16}
    cfg = tiny_run(tmp_path / kind, train_file, byte_tokenizer_dir, teacher=cross_teacher,
                   objective={"name": "dskdv2"}, data={"dev": str(dev_file)}, eval={"every_steps": 2},
                   optimization={"max_steps": 8}, checkpoint={"every_steps": 4, "keep_last": 3, "keep_best": False},
                   source=source)
    run = train(validate_config(cfg))
    ref = read_metrics(run)
    shutil.rmtree(run / "checkpoints" / "step-00000008")
    shutil.rmtree(run / "final")
    if kind == "replay":
        assert (run / "checkpoints" / "step-00000004" / "source-rank0.json").exists()
    train(validate_config(cfg), resume=True)
    got = read_metrics(run)
    assert [r["step"] for r in got] == list(range(1, 9)) and len(ref) == 8
    assert any(r["sampled"] for r in got[4:])
    for a, b in zip(ref, got):
        assert (a["loss"], a["sampled"], a["grad_norm"]) == (b["loss"], b["sampled"], b["grad_norm"])


def test_seqkd_source_generates_teacher_outputs_then_trains(tmp_path: Path, train_file: Path,
                                                            byte_tokenizer_dir: Path, teacher_dir: Path) -> None:
    import json

    cfg = tiny_run(tmp_path / "seqkd", train_file, byte_tokenizer_dir, teacher=teacher_dir,
                   objective={"name": "sft"}, data={"max_examples": 16}, optimization={"max_steps": 4},
                   generation={"max_new_tokens": 12, "max_length": 96, "max_prompt_length": 80},
                   source={"kind": "seqkd"})
    run = train(validate_config(cfg))
    made = [json.loads(line) for line in (run / "seqkd-train.jsonl").read_text().splitlines()]
    originals = [json.loads(line) for line in train_file.read_text().splitlines()][:16]
    assert 0 < len(made) <= 16
    assert {m["prompt"] for m in made} <= {o["prompt"] for o in originals}
    assert any(m["output"] != m["references"][0] for m in made)  # the teacher's words, not the references
    assert len(read_metrics(run)) == 4
    # a second run with the file given reuses it (no teacher needed)
    again = {"kind": "seqkd", "seqkd_data": str(run / "seqkd-train.jsonl")}
    cfg2 = tiny_run(tmp_path / "again", train_file, byte_tokenizer_dir, objective={"name": "sft"},
                    optimization={"max_steps": 2}, source=again)
    assert len(read_metrics(train(validate_config(cfg2)))) == 2


def test_seqkd_decodes_greedily_unless_asked_to_sample(tmp_path: Path, train_file: Path,
                                                       byte_tokenizer_dir: Path, teacher_dir: Path) -> None:
    """Kim & Rush decode the teacher greedily (or by beam search), not with the evaluation protocol's sampling."""
    from dualkd.train.seqkd import teacher_decoding

    raw = tiny_run(tmp_path / "s", train_file, byte_tokenizer_dir, teacher=teacher_dir, objective={"name": "sft"},
                   source={"kind": "seqkd"}, generation={"num_beams": 3})
    cfg = validate_config(raw)
    assert cfg.generation.do_sample and not teacher_decoding(cfg).do_sample
    assert teacher_decoding(cfg).num_beams == 3
    sampled = validate_config({**raw, "source": {"kind": "seqkd", "seqkd_sampling": True}})
    assert teacher_decoding(sampled).do_sample


def test_sampling_does_not_move_the_training_rng(teacher_dir: Path) -> None:
    """Dropout masks of a training step are the same whether or not the student sampled first."""
    from contextlib import contextmanager

    from dualkd.config import GenerationConfig
    from dualkd.generate import load_for_generation
    from dualkd.train.samplers import HFSampler

    model, tok = load_for_generation(teacher_dir)
    model.train()

    @contextmanager
    def model_fn():
        yield model

    sampler = HFSampler(model_fn, GenerationConfig(max_new_tokens=5, max_length=64, max_prompt_length=32),
                        tok.eos_token_id, tok.eos_token_id)
    ids = torch.tensor([tok("a b c", add_special_tokens=False)["input_ids"]])
    torch.manual_seed(5)
    expected = model(input_ids=ids).logits
    torch.manual_seed(5)
    samples = sampler([ids[0].tolist()], seed=1, step=0)
    assert model.training and len(samples) == 1
    assert torch.equal(model(input_ids=ids).logits, expected)


@pytest.mark.parametrize("name", ["tiny-on-policy", "tiny-cross-on-policy", "tiny-replay", "tiny-seqkd"])
def test_tiny_sampling_recipes_run(name: str, tmp_path: Path, teacher_dir: Path) -> None:
    from dualkd.config import load_config
    from tests.helpers import REPO

    overrides = [f"output_dir={tmp_path / name}", f"teacher.path={teacher_dir}", "optimization.max_steps=6",
                 "eval.every_steps=3", "checkpoint.every_steps=3", "data.train.num_examples=128",
                 "data.dev.num_examples=32"]
    if name != "tiny-cross-on-policy":
        overrides.append(f"student.tokenizer={teacher_dir}")
    if name.endswith("on-policy"):
        overrides.append("source.on_policy_after=1")
    if name == "tiny-seqkd":  # the random test teacher answers greedily with EOS only: let it sample
        overrides += ["generation.do_sample=true", "source.seqkd_sampling=true"]
    records = read_metrics(train(load_config(REPO / "configs" / f"{name}.yaml", overrides)))
    assert len(records) == 6 and all(math.isfinite(r["loss"]) for r in records)
    if name != "tiny-seqkd":
        assert any(r["sampled"] for r in records)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM samples on a CUDA GPU (scripts/gpu-check.sh)")
def test_vllm_sampler_on_gpu(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path, teacher_dir: Path) -> None:
    """The vLLM backend end to end: a tiny on-policy KD run whose samples come from vLLM beside the trainer."""
    pytest.importorskip("vllm", reason="vLLM is not installed")
    cfg = tiny_run(tmp_path / "vllm", train_file, byte_tokenizer_dir, teacher=teacher_dir,
                   source={**ON_POLICY, "backend": "vllm"}, optimization={"max_steps": 4})
    records = read_metrics(train(validate_config(cfg)))
    assert any(r["sampled"] for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)
