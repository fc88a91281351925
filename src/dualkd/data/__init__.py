"""Data: record formats (`formats`), readers with file:line errors (`readers`), tokenization with character
offsets and prompt masking (`dataset`), padding into batches (`collate`), toy tasks (`synthetic`) and BPE
training for from-scratch models (`tokenizers`).

Import from the submodules; this package file stays empty so that `dualkd.config` and `dualkd.methods`
can import data types without import cycles.
"""
