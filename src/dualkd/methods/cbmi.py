"""CBMI-based adaptive training for translation (arXiv 2203.02951).
Not distillation: the model being trained reweights its own label-smoothed CE token by token.

    CBMI_t = log p_NMT(y_t | x, y_<t) − log p_LM(y_t | y_<t)            (detached)
    token weight     w_tok = max(0, 1 + λ_tok·(CBMI_t − μ_s)/σ_s)       within each sentence s
    sentence weight  w_snt = max(0, 1 + λ_snt·(μ_s − μ_B)/σ_B)          across the batch
    L = Σ_t w_tok·w_snt·CE_ls(NMT) + λ_LM·Σ_t CE_ls(LM)                 / target tokens

p_LM is a separate target-side language model with no parameters shared with the NMT model (by default a
GPT-2-style decoder sized like the NMT decoder, tied embeddings, trained from scratch here; `lm_path` loads
one). It reads the same decoder inputs as the NMT decoder, so both predict labels[t] at position t. Before
`pretrain_steps` both train without weighting (w = 1); from then on the weights apply and, with
`freeze_lm` (the official `--finetune-fix-lm`), the LM gets no gradient. σ are proper standard deviations
over the real tokens (sentences) with ε; `compat: true` reproduces the official code: its denominators (the
padded length T for both σ, no ε; NaN on a one-token sentence) and its CBMI log p_NMT − log(p_LM + 1e-9)
(the floor changes the weights by up to 6e-2 where p_LM(gold) is tiny).

The paper's idea, the official code as verified and the switches: docs/methods/translation.md.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from dualkd.data.collate import Batch
from dualkd.errors import ModelError
from dualkd.lm import is_seq2seq, lm_forward
from dualkd.losses.cross_entropy import label_smoothed_cross_entropy
from dualkd.methods.base import Objective, SetupContext, StepNorm, token_accuracy
from dualkd.methods.needs import Needs
from dualkd.methods.spec import ObjectiveSpec
from dualkd.models import ModelConfig, load_model


class CBMIConfig(ObjectiveSpec):
    name: Literal["cbmi"] = "cbmi"
    token_scale: float = Field(0.1, ge=0)
    """λ_tok (paper: 0.1)."""
    sentence_scale: float = Field(0.3, ge=0)
    """λ_sent (paper: 0.3)."""
    lm_rate: float = Field(0.01, ge=0)
    """λ_LM: weight of the LM's own loss (paper: 0.01)."""
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    """ε of both CEs (paper: 0.1)."""
    pretrain_steps: int = Field(0, ge=0)
    """Optimizer steps of joint NMT + LM training without weighting before the weights switch on."""
    freeze_lm: bool = True
    """After the switch, the LM gets no gradient (the official `--finetune-fix-lm`)."""
    lm_arch: dict[str, Any] = Field(default_factory=dict)
    """Config fields of the target LM (a causal `model_type`); empty: GPT-2 sized like the NMT decoder."""
    lm_path: str | None = None
    """Load the target LM from a folder instead (same tokenizer)."""
    eps: float = Field(1e-6, gt=0)
    """ε inside both standard deviations."""
    compat: bool = False
    """The official code's arithmetic: σ over the padded length without ε, and p_LM + 1e-9 inside the log."""


def cbmi_values(nmt_logits: Tensor, lm_logits: Tensor, labels: Tensor, lm_floor: float = 0.0) -> Tensor:
    """log p_NMT(y) − log(p_LM(y) + lm_floor) per position (fp32 or wider, no gradient): [B, T, V], [B, T, V'],
    [B, T] -> [B, T]. The official code uses lm_floor = 1e-9."""
    with torch.no_grad():
        y = labels.unsqueeze(-1)
        dtype = torch.promote_types(nmt_logits.dtype, torch.float32)
        nmt = torch.log_softmax(nmt_logits.to(dtype), -1).gather(-1, y).squeeze(-1)
        lm = torch.log_softmax(lm_logits.to(dtype), -1).gather(-1, y).squeeze(-1)
        return nmt - (torch.log(lm.exp() + lm_floor) if lm_floor else lm)


def cbmi_weights(cbmi: Tensor, mask: Tensor, token_scale: float, sentence_scale: float, eps: float = 1e-6,
                 compat: bool = False) -> Tensor:
    """w_tok·w_sent per position (0 off the mask, detached): [B, T], [B, T] bool -> [B, T]."""
    with torch.no_grad():
        m = mask.float()
        T = float(mask.shape[-1])
        n = m.sum(-1)  # real tokens per sentence
        mu = (cbmi * m).sum(-1) / n.clamp(min=1)
        dev2 = ((cbmi - mu[:, None]) ** 2 * m).sum(-1)
        if compat:  # the official code: padded length T, no ε
            sigma = (dev2 / T).sqrt()
        else:
            sigma = (dev2 / n.clamp(min=1) + eps).sqrt()
        w_tok = torch.relu(1 + token_scale * (cbmi - mu[:, None]) / sigma[:, None]) * m
        real = n > 0
        mu_b = mu[real].mean()
        dev2_b = ((mu[real] - mu_b) ** 2).sum()
        sigma_b = (dev2_b / T).sqrt() if compat else (dev2_b / real.sum().clamp(min=1) + eps).sqrt()
        w_sent = torch.relu(1 + sentence_scale * (mu - mu_b) / sigma_b)
        return w_tok * w_sent[:, None]


class CBMI(Objective):
    def needs(self) -> Needs:
        return Needs(unused_parameters=True)  # its LM trains first, then freezes

    config: CBMIConfig

    def setup(self, ctx: SetupContext) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        student = ctx.student
        if not is_seq2seq(student):
            raise ModelError("objective `cbmi` reweights a translation model's CE: it needs an encoder-decoder student")
        cfg = self.config
        if cfg.lm_path:
            lm = load_model(ModelConfig(path=cfg.lm_path), ctx.student_tokenizer, role="target-side LM",
                            field="objective.lm_path")
        else:
            c = student.config
            fields = {"model_type": "gpt2", "vocab_size": len(ctx.student_tokenizer),
                      "n_embd": getattr(c, "d_model", 512), "n_layer": getattr(c, "decoder_layers", 6),
                      "n_head": getattr(c, "decoder_attention_heads", 8),
                      "n_inner": getattr(c, "decoder_ffn_dim", None),
                      "n_positions": getattr(c, "max_position_embeddings", 1024), "tie_word_embeddings": True,
                      "bos_token_id": ctx.student_tokenizer.eos_token_id,
                      "eos_token_id": ctx.student_tokenizer.eos_token_id, **cfg.lm_arch}
            lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
        if lm.get_output_embeddings().weight.shape[0] < len(ctx.student_tokenizer):
            raise ModelError("objective `cbmi`: the target LM's vocabulary is smaller than the tokenizer")
        self.lm = lm  # a submodule: trained (its own optimizer group), checkpointed, saved beside the student
        self.vocab_size = len(ctx.student_tokenizer)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.lm.parameters()), "name": "cbmi_lm"}]  # the student's learning rate

    def weighting(self, step: int) -> bool:
        """Whether the CBMI weights apply at this optimizer step (the phase switch)."""
        return step >= self.config.pretrain_steps

    def forward(self, student: nn.Module, batch: Batch, teacher_out: Any, norm: StepNorm
                ) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, tokens = self.config, batch.student
        mask = tokens.loss_mask
        nmt_logits = lm_forward(student, tokens).logits  # [B, T, V]
        decoder_inputs = student.prepare_decoder_input_ids_from_labels(labels=tokens.labels.masked_fill(~mask, -100))
        weighting = self.weighting(norm.step)
        frozen = weighting and cfg.freeze_lm
        # frozen: no graph through the LM, so its parameters get no gradient and AdamW leaves them untouched
        # (they stay trainable parameters, so checkpoints and resume see the same set throughout)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            lm_logits = self.lm(input_ids=decoder_inputs, use_cache=False).logits[..., : self.vocab_size]
        nmt_ce = label_smoothed_cross_entropy(nmt_logits, tokens.labels, mask, cfg.label_smoothing)  # [B, T]
        lm_ce = label_smoothed_cross_entropy(lm_logits, tokens.labels, mask, cfg.label_smoothing)
        cbmi = cbmi_values(nmt_logits, lm_logits, tokens.labels, lm_floor=1e-9 if cfg.compat else 0.0)
        w = cbmi_weights(cbmi, mask, cfg.token_scale, cfg.sentence_scale, cfg.eps, cfg.compat) if weighting \
            else mask.float()
        n = norm["tokens"]
        loss = ((w * nmt_ce).sum() * norm.ce_weight + cfg.lm_rate * lm_ce.sum()) / n
        m = mask.float()
        return loss, {"ce": (nmt_ce.detach() * m).sum() / n, "lm_ce": lm_ce.detach().sum() / n,
                      "cbmi": (cbmi * m).sum() / n, "weight": (w * m).sum() / n,
                      "weighting": torch.tensor(float(weighting)) * m.sum() / n,  # 1 after the switch
                      "acc": token_accuracy(nmt_logits.detach(), tokens.labels, mask) / n}
