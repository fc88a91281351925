"""The rows of the methods table: which objective, source and tokenizer each trains (see README.md here).

Every student is the same GPT-2 (2 layers, d = 64) with a vocabulary of the teacher's size: the same-tokenizer
rows use the teacher's byte-level BPE, the own-tokenizer rows a SentencePiece-style (metaspace) BPE trained on
the students' data. They differ only in the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

LRS = (1e-3, 3e-3, 1e-2)
SEEDS = (10, 11, 12)
ON_POLICY = "{kind: on_policy, student_gen_ratio: 0.5, on_policy_after: 10, on_policy_after_unit: epochs}"
GENERATION = "{do_sample: true, max_length: 64, max_prompt_length: 40, no_repeat_ngram_size: 0, batch_size: 64}"


@dataclass(frozen=True)
class Row:
    name: str
    tokenizer: str  # "teacher" | "own"
    objective: str
    what: str
    source: str | None = None
    base: str | None = None
    """An ablation: the row it varies, whose chosen lr it trains with (no grid of its own)."""
    teacher_vocab: int | None = None
    """An ablation of the teacher's tokenizer: a teacher trained with this vocabulary size (the students' own
    tokenizer stays that of the main teacher's size)."""


ROWS = (
    Row("sft", "teacher", "{name: sft}", "SFT"),
    Row("kd-fkl", "teacher", "{name: kd, divergence: fkl}", "KD, forward KL"),
    Row("kd-rkl", "teacher", "{name: kd, divergence: rkl}", "KD, reverse KL"),
    Row("kd-js", "teacher", "{name: kd, divergence: js}", "KD, Jensen-Shannon"),
    Row("kd-tvd", "teacher", "{name: kd, divergence: tvd}", "KD, total variation"),
    Row("kd-skl", "teacher", "{name: kd, divergence: skl}", "KD, skewed KL (λ 0.1)"),
    Row("kd-srkl", "teacher", "{name: kd, divergence: srkl}", "KD, skewed RKL (λ 0.1)"),
    Row("kd-akl", "teacher", "{name: kd, divergence: akl}", "KD, adaptive KL"),
    Row("dskd-fkl", "teacher", "{name: dskd, divergence: fkl}", "DSKD, forward KL"),
    Row("dskd-rkl", "teacher", "{name: dskd, divergence: rkl}", "DSKD, reverse KL"),
    Row("dskdv2", "teacher", "{name: dskdv2, divergence: fkl}", "DSKDv2, same vocabulary"),
    Row("seqkd", "teacher", "{name: sft}", "SeqKD (teacher's greedy outputs)", "{kind: seqkd}"),
    Row("on-policy-kd-fkl", "teacher", "{name: kd, divergence: fkl}", "on-policy KD, forward KL", ON_POLICY),
    Row("own-sft", "own", "{name: sft}", "SFT"),
    Row("own-dskd-cma", "own", "{name: dskd_cma, version: 1, divergence: fkl}", "DSKD-CMA (v1)"),
    Row("own-dskdv2-eta", "own", "{name: dskdv2, alignment: eta, divergence: fkl}", "DSKDv2-ETA"),
    Row("own-dskdv2-cma", "own", "{name: dskdv2, alignment: cma, divergence: fkl}", "DSKDv2-CMA"),
    Row("own-uld", "own", "{name: uld}", "ULD"),
    Row("own-mined", "own", "{name: mined}", "MinED"),
    Row("own-gold", "own", "{name: gold}", "GOLD (TRL's cross-tokenizer loss)"),
    Row("own-shared-vocab-kd", "own", "{name: shared_vocab_kd}", "KD over the shared vocabulary (KDFlow)"),
    Row("own-xtoken-pkl", "own", "{name: xtoken, loss: pkl}", "X-Token P-KL (NeMo RL)"),
    Row("own-xtoken-hkl", "own", "{name: xtoken, loss: hkl}", "X-Token H-KL (NeMo RL)"),
    Row("own-on-policy-dskdv2-eta", "own", "{name: dskdv2, alignment: eta, divergence: fkl}",
        "on-policy DSKDv2-ETA", ON_POLICY),
)

_ETA = "name: dskdv2, alignment: eta, divergence: fkl"
_ETA_5E4 = _ETA + ", projector_lr: 5.0e-4"
ETA_SCRIPTS = "eta-projector_lr-5e-4"
"""DSKDv2-ETA with the DSKDv2 scripts' projector lr (5e-4): the row the ablations vary one setting of."""

# what moves the cross-tokenizer result: DSKDv2-ETA with one setting changed, at DSKDv2-ETA's chosen lr, 3
# seeds (on-policy sampling is a row of the table: own-on-policy-dskdv2-eta)
ABLATIONS = (
    Row(ETA_SCRIPTS, "own", f"{{{_ETA_5E4}}}", "DSKDv2-ETA, projector lr 5e-4 (the DSKDv2 scripts')",
        base="own-dskdv2-eta"),
    Row("eta-projector_lr-5e-5", "own", f"{{{_ETA}, projector_lr: 5.0e-5}}", "… projector lr 5e-5", base=ETA_SCRIPTS),
    Row("eta-projector_lr-5e-3", "own", f"{{{_ETA}, projector_lr: 5.0e-3}}", "… projector lr 5e-3", base=ETA_SCRIPTS),
    Row("eta-kd_rate-0.1", "own", f"{{{_ETA_5E4}, kd_rate: 0.1}}", "… kd_rate 0.1", base=ETA_SCRIPTS),
    Row("eta-kd_rate-0.9", "own", f"{{{_ETA_5E4}, kd_rate: 0.9}}", "… kd_rate 0.9", base=ETA_SCRIPTS),
    Row("eta-tau-2", "own", f"{{{_ETA_5E4}, temperature: 2.0}}", "… τ 2 (the papers')", base=ETA_SCRIPTS),
    Row("eta-spaces-teacher", "own", f"{{{_ETA_5E4}, spaces: teacher}}",
        "… KD in the teacher's space only (no projected target)", base=ETA_SCRIPTS),
    Row("eta-spaces-student", "own", f"{{{_ETA_5E4}, spaces: student}}", "… KD in the student's space only",
        base=ETA_SCRIPTS),
    Row("eta-teacher_vocab-300", "own", f"{{{_ETA_5E4}}}", "… a teacher tokenizer of 300 tokens", base=ETA_SCRIPTS,
        teacher_vocab=300),
)
ALL_ROWS = ROWS + ABLATIONS
BY_NAME = {row.name: row for row in ALL_ROWS}
FIRST = ("sft", "own-sft", "own-dskdv2-eta", "kd-fkl", "dskd-fkl")
"""The rows trained first: the comparison the table exists for; then the rest, the ablations last."""
