"""dualkd: knowledge distillation for language models (DSKD family, cross-tokenizer KD, AlignDistil, TIE-KD, CBMI)."""

__version__ = "0.1.0"
