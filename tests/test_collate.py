"""Tokenization, prompt masking, offsets, truncation, dynamic padding and length bucketing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from dualkd.config import DataConfig, DataSource
from dualkd.data.collate import TokenizedExample, pad_batch
from dualkd.data.dataset import TruncationRules, build_dataset, tokenize_examples
from dualkd.data.formats import Example, parse_record
from dualkd.train.sources import OffPolicySource, token_budget_split
from tests.helpers import needs_real_models, needs_shared_data, synthetic_records, write_jsonl


def _examples(n: int = 12) -> list[Example]:
    return [parse_record(r, f"mem:{i + 1}") for i, r in enumerate(synthetic_records(n, seed=9))]


def _dataset(tmp_path: Path, tokenizer, n: int = 12, teacher=None, **data):
    f = write_jsonl(tmp_path / "d.jsonl", synthetic_records(n, seed=9))
    cfg = DataConfig(train=str(f), **{"max_length": 128, "max_prompt_length": 100, **data})
    return build_dataset(cfg.train, cfg, tokenizer, teacher)[0]


def test_loss_mask_covers_exactly_response_and_eos(tmp_path: Path, byte_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    ds = _dataset(tmp_path, tok)
    batch = ds.collate(list(range(len(ds))))
    s = batch.student
    for b, ex in enumerate(ds.examples):
        predicted = s.labels[b][s.loss_mask[b]].tolist()
        assert predicted[-1] == tok.eos_token_id
        assert tok.decode(predicted[:-1]) == ex.response
        # everything before is prompt: the masked-out labels decode to the prompt minus its first token
        n = int(s.attention_mask[b].sum())
        prompt_labels = s.labels[b][:n][~s.loss_mask[b][:n]].tolist()
        assert tok.decode(s.input_ids[b][:1].tolist() + prompt_labels) == ex.prompt
    # labels are the inputs shifted by one
    n0 = int(s.attention_mask[0].sum())
    assert torch.equal(s.labels[0, : n0 - 1], s.input_ids[0, 1:n0])


def test_offsets_point_into_the_text(tmp_path: Path, byte_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    ds = _dataset(tmp_path, tok)
    s = ds.collate([0, 1, 2]).student
    for b in range(3):
        text = s.texts[b]
        n = int(s.attention_mask[b].sum()) + 1  # all sequence tokens
        spans = s.offsets[b, :n].tolist()
        assert s.offsets[b, n:].eq(-1).all()
        assert "".join(text[a:e] for a, e in spans) == text  # byte-level BPE: spans tile the text
        assert spans[-1] == [len(text), len(text)]  # the appended EOS has an empty span at the end
        assert text[: s.prompt_chars[b]] == ds.examples[b].prompt


def test_dynamic_padding_and_multiple(tmp_path: Path, byte_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    ds = _dataset(tmp_path, tok)
    batch = ds.collate([0, 1])
    longest = max(len(ds.student[0].ids), len(ds.student[1].ids))
    assert batch.student.input_ids.shape == (2, longest - 1)  # the longest in the batch, not max_length
    ds8 = _dataset(tmp_path, tok, pad_to_multiple_of=8)
    assert ds8.collate([0, 1]).student.input_ids.shape[1] % 8 == 0


def test_truncation_like_the_papers(byte_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    ex = parse_record({"prompt": "one two three four five six seven eight nine ten", "output": " alpha beta gamma"},
                      "m:1")
    full = tokenize_examples([ex], tok, TruncationRules(max_length=512, max_prompt_length=None))[0]
    start = tokenize_examples([ex], tok, TruncationRules(512, 4, "keep_start"))[0]
    end = tokenize_examples([ex], tok, TruncationRules(512, 4, "keep_end"))[0]
    cut = tokenize_examples([ex], tok, TruncationRules(full.prompt_len + 2, None))[0]
    assert start.prompt_len == 4 and start.ids[:4] == full.ids[:4]
    assert end.prompt_len == 4 and end.ids[:4] == full.ids[full.prompt_len - 4: full.prompt_len]
    assert start.ids[4:] == full.ids[full.prompt_len:]  # the response is untouched by prompt truncation
    assert cut.ids == full.ids[: full.prompt_len + 2]  # max_length cuts the end of the sequence (EOS lost)


def test_special_token_text_in_data_stays_text(byte_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    ex = parse_record({"prompt": "say <|endoftext|> now", "output": "ok"}, "m:1")
    t = tokenize_examples([ex], tok, TruncationRules(128, 100))[0]
    assert t.ids.count(tok.eos_token_id) == 1  # only the appended EOS


def test_chat_records_mask_the_template_prompt(tmp_path: Path, byte_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Add 2 and 3."},
                                                             {"role": "assistant", "content": "5"}]}])
    cfg = DataConfig(train=str(f))
    ds, _ = build_dataset(cfg.train, cfg, tok)
    s = ds.collate([0]).student
    predicted = s.labels[0][s.loss_mask[0]].tolist()
    # the template's end-of-turn token is the EOS here, so none is appended twice
    assert tok.decode(predicted) == "5<|endoftext|>\n"
    assert predicted.count(tok.eos_token_id) == 1


def test_teacher_tokenized_separately_with_its_offsets(tmp_path: Path, byte_tokenizer_dir: Path,
                                                      meta_tokenizer_dir: Path) -> None:
    student_tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    teacher_tok = AutoTokenizer.from_pretrained(meta_tokenizer_dir)
    ds = _dataset(tmp_path, student_tok, teacher=teacher_tok)
    batch = ds.collate([0, 1, 2])
    assert batch.teacher is not None
    s, t = batch.student, batch.teacher
    assert s.texts == t.texts and s.prompt_chars == t.prompt_chars
    for b in range(3):
        tl = t.labels[b][t.loss_mask[b]].tolist()
        assert teacher_tok.decode(tl, skip_special_tokens=True).strip() == ds.examples[b].response.strip()
        n = int(t.attention_mask[b].sum()) + 1
        # response-token spans lie inside the response text
        resp = [o for o, m in zip(t.offsets[b, 1:n].tolist(), t.loss_mask[b].tolist()) if m]
        assert all(a >= t.prompt_chars[b] for a, _ in resp)
    assert ds.lengths == [max(len(a.ids), len(c.ids)) - 1 for a, c in zip(ds.student, ds.teacher)]


def test_bos_added_when_the_tokenizer_adds_one(byte_tokenizer_dir: Path) -> None:
    from tokenizers import processors

    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    t = tokenize_examples(_examples(1), tok, TruncationRules(128, 100))[0]
    assert t.ids[0] == bos and t.offsets[0] == (0, 0)


def test_length_bucketing_is_seeded_and_pads_less(tmp_path: Path, byte_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    f = write_jsonl(tmp_path / "d.jsonl", synthetic_records(400, seed=1) + [
        {"prompt": "x " * k, "output": "y"} for k in range(1, 60, 3)])
    cfg = DataConfig(train=str(f), max_length=128, max_prompt_length=100)
    ds, _ = build_dataset(cfg.train, cfg, tok)

    def padding(bucket: bool) -> float:
        src = OffPolicySource(ds, 4, 1, 1, 0, seed=3, bucket_by_length=bucket)
        pad = total = 0
        for _ in range(src.steps_per_epoch):
            s = src.next_step().gold[0].student
            pad += int((s.attention_mask == 0).sum())
            total += s.attention_mask.numel()
        return pad / total

    assert padding(True) < 0.5 * padding(False)
    a = OffPolicySource(ds, 4, 1, 1, 0, seed=3).epoch_order(0)
    b = OffPolicySource(ds, 4, 1, 1, 0, seed=3).epoch_order(0)
    c = OffPolicySource(ds, 4, 1, 1, 0, seed=3).epoch_order(1)
    assert a == b and a != c
    assert sorted(i for batch in a for i in batch) == sorted(set(i for batch in a for i in batch))


def test_global_batches_do_not_depend_on_the_split(tmp_path: Path, byte_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    ds = _dataset(tmp_path, tok, n=40)
    one = OffPolicySource(ds, 8, 1, 1, 0, seed=1)
    accum = OffPolicySource(ds, 2, 4, 1, 0, seed=1)
    ranks = [OffPolicySource(ds, 2, 2, 2, r, seed=1) for r in range(2)]
    for _ in range(one.steps_per_epoch):
        a = one.next_step().gold[0].indices
        b = [i for mb in accum.next_step().gold for i in mb.indices]
        c = [i for src in ranks for mb in src.next_step().gold for i in mb.indices]
        assert a == b == c


def test_token_budget_split_keeps_each_step_and_equal_pass_counts() -> None:
    lengths = [3, 3, 4, 5, 9, 10, 30, 40] + [2] * 8
    shares = [[0, 1, 2, 3, 4, 5, 6, 7], list(range(8, 16))]  # each sorted by length
    split = token_budget_split(shares, lengths, budget=20)
    # rank 0: 3+3+4+5 fit as 4 x 5 = 20; 9 and 10 as 2 x 10; 30 and 40 alone (over the budget)
    # rank 1: eight 2s fit in one pass (16 tokens), split in halves until it has rank 0's 4 passes
    assert split[0] == [[0, 1, 2, 3], [4, 5], [6], [7]]
    assert [len(m) for m in split[1]] == [2, 2, 2, 2] and [j for m in split[1] for j in m] == shares[1]
    for share, micro in zip(shares, split):
        assert [j for m in micro for j in m] == share
        for m in micro:
            assert len(m) == 1 or len(m) * max(lengths[j] for j in m) <= 20


def test_token_budget_source_serves_the_same_steps(tmp_path: Path, byte_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    ds = _dataset(tmp_path, tok, n=40)
    fixed = OffPolicySource(ds, 4, 2, 1, 0, seed=1)
    budget = OffPolicySource(ds, 4, 2, 1, 0, seed=1, micro_batch_tokens=64)
    counts = set()
    for _ in range(fixed.steps_per_epoch):
        a = [i for mb in fixed.next_step().gold for i in mb.indices]
        step = budget.next_step().gold
        assert [i for mb in step for i in mb.indices] == a
        for mb in step:
            assert mb.student.input_ids.numel() <= 64 or len(mb.indices) == 1
        counts.add(len(step))
    assert counts != {2}  # the budget, not the example count, decided the passes


# ------------------------------------------------------------------------------------------- real tokenizers


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tokenizers/gpt2", "smollm2-135m-instruct", "gemma-3-270m",
                                  "tokenizers/mistral-sp32k", "tokenizers/qwen2"])
def test_real_tokenizers_on_dolly(name: str) -> None:
    root = needs_real_models()
    data = needs_shared_data()
    tok = AutoTokenizer.from_pretrained(root / name)
    cfg = DataConfig(train=DataSource(path=str(data / "dolly" / "test.jsonl")), max_length=512,
                     max_prompt_length=256)
    ds, report = build_dataset(cfg.train, cfg, tok)
    assert report.kept == 500 and not report.skipped
    batch = ds.collate(list(range(0, 500, 25)))
    s = batch.student
    for b, i in enumerate(range(0, 500, 25)):
        ex = ds.examples[i]
        n = int(s.attention_mask[b].sum()) + 1
        spans = [(a, e) for a, e in s.offsets[b, :n].tolist()]
        text = s.texts[b]
        assert all(0 <= a <= e <= len(text) for a, e in spans)
        resp_ids = s.labels[b][s.loss_mask[b]].tolist()
        if resp_ids[-1] == tok.eos_token_id:  # not cut by max_length
            decoded = tok.decode(resp_ids[:-1])
            assert decoded.strip() == ex.response.strip()


@pytest.mark.slow
def test_dolly_prompts_fit_256_gpt2_tokens() -> None:
    root = needs_real_models()
    data = needs_shared_data()
    tok = AutoTokenizer.from_pretrained(root / "tokenizers/gpt2")
    cfg = DataConfig(train=str(data / "dolly" / "dev.jsonl"), max_prompt_length=None, max_length=4096)
    ds, _ = build_dataset(cfg.train, cfg, tok)
    assert max(t.prompt_len for t in ds.student) <= 256  # the protocol's filter (shared/data/README.md)


def _pad_batch_naive(items: list[TokenizedExample], pad_id: int, multiple: int | None) -> dict[str, torch.Tensor]:
    """pad_batch's twin, written from its contract one example and one position at a time."""
    T = max(len(x.ids) for x in items) - 1
    if multiple:
        T = -(-T // multiple) * multiple
    out = {"input_ids": torch.full((len(items), T), pad_id), "attention_mask": torch.zeros(len(items), T).long(),
           "labels": torch.zeros(len(items), T).long(), "loss_mask": torch.zeros(len(items), T, dtype=torch.bool),
           "offsets": torch.full((len(items), T + 1, 2), -1)}
    for b, x in enumerate(items):
        for t in range(len(x.ids) - 1):
            out["input_ids"][b, t], out["labels"][b, t], out["attention_mask"][b, t] = x.ids[t], x.ids[t + 1], 1
            out["loss_mask"][b, t] = t + 1 >= x.prompt_len
        for t, span in enumerate(x.offsets):
            out["offsets"][b, t] = torch.tensor(span)
    return out


@pytest.mark.parametrize("multiple", [None, 8])
def test_pad_batch_is_its_naive_twin(multiple: int | None) -> None:
    """Rows of different lengths, a prompt that is the whole row (no loss token), a prompt of 0 or 1 token, a
    one-token row (no input position)."""
    gen = torch.Generator().manual_seed(0)
    items = []
    for length, prompt_len in [(9, 3), (5, 5), (7, 0), (4, 1), (1, 1), (12, 6)]:
        ids = torch.randint(1, 500, (length,), generator=gen).tolist()
        offsets = [(2 * i, 2 * i + 2) for i in range(length)]
        items.append(TokenizedExample(ids=ids, offsets=offsets, prompt_len=prompt_len, text="x" * 2 * length,
                                      prompt_chars=2 * prompt_len))
    batch = pad_batch(items, pad_id=0, pad_to_multiple_of=multiple)
    for name, want in _pad_batch_naive(items, 0, multiple).items():
        got = getattr(batch, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert batch.prompt_lengths.tolist() == [3, 5, 0, 1, 1, 6]
