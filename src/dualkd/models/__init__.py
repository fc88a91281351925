"""Models: where they come from (config.py), loading them (load.py), LoRA (lora.py), how two vocabularies
relate (vocab.py), writing them out (export.py).

    tokenizer = load_tokenizer(cfg.student, train_texts=...)
    student = load_model(cfg.student, tokenizer, role="student", seed=cfg.seed)
    teacher = load_model(cfg.teacher, teacher_tokenizer, role="teacher")   # frozen: eval mode, no grad
    model, tokenizer = load_folder(run_dir / "final")                       # a saved model, frozen
"""

from dualkd.models.config import DTYPES, LoraConfig, ModelConfig, TokenizerTrainConfig
from dualkd.models.export import attribute_state_dict, export_model
from dualkd.models.load import check_arch, freeze, is_encoder_decoder, load_folder, load_model, load_tokenizer
from dualkd.models.lora import apply_lora, is_lora
from dualkd.models.vocab import head_rows, same_vocabulary, shared_vocab_size

__all__ = ["DTYPES", "LoraConfig", "ModelConfig", "TokenizerTrainConfig", "apply_lora", "attribute_state_dict",
           "check_arch", "export_model", "freeze", "head_rows", "is_encoder_decoder", "is_lora", "load_folder",
           "load_model", "load_tokenizer", "same_vocabulary", "shared_vocab_size"]
