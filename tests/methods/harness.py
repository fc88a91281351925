"""What every float64 twin test shares: the objective under test run as the loop runs it, in float64, and
the plain-torch pieces a twin writes its formula with.

A twin computes an objective's loss from its module docstring's formula on the models' dense [N, V] logits,
with the projectors and the alignment passed in explicitly; it shares no code with the implementation. Both
run in float64 (models, projectors and buffers converted after `setup`), so they agree to rounding and a
tolerance of 1e-5 leaves no room for a wrong term.

    parts = build64(config, tmp_path)
    assert_is_its_formula(parts, my_twin)   # one micro-batch of 8 against my_twin(parts, batch), then 2 x 4 == 8 x 1
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dualkd.config import validate_config
from dualkd.methods.base import StepNorm
from dualkd.train.build import build_parts
from dualkd.train.engine import LocalEngine
from dualkd.train.step import TrainModule

ENGINE = LocalEngine()
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
RTOL = 1e-5


def build64(cfg: dict[str, Any], tmp: Path) -> Any:
    """The run's parts (student, teacher, objective, data) with every model and the objective in float64."""
    parts = build_parts(validate_config(cfg), tmp, ENGINE)
    teacher = parts.teacher.model if parts.teacher is not None else None
    for model in (parts.student, teacher, parts.objective, *(t.model for t in (parts.frozen or {}).values())):
        if model is not None:
            model.double()
    parts.student.eval()  # no dropout: the twin's forward must see the same network
    parts.objective.eval()  # nor in the objective's own modules (CBMI's LM)
    return parts


def trained(parts: Any) -> dict[str, nn.Parameter]:
    """The parameters the optimizer trains: the student's and the objective's (projectors, CBMI's LM)."""
    named = {f"student.{k}": p for k, p in parts.student.named_parameters() if p.requires_grad}
    named.update({f"objective.{k}": p for k, p in parts.objective.named_parameters() if p.requires_grad})
    return named


def implementation(parts: Any, micro_batches: list[list[int]], step: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of one optimizer step as the loop computes it (teacher on every micro-batch, counts summed over
    them, then each micro-batch's loss), summed over the micro-batches; and its gradients."""
    obj, student = parts.objective, parts.student
    batches = [parts.train_set.collate(ix) for ix in micro_batches]
    teacher_outs = [obj.teacher_forward(parts.teacher, b) for b in batches]
    totals: dict[str, float] = {}
    for i, b in enumerate(batches):
        teacher_outs[i], counts = obj.prepare(b, teacher_outs[i], student)
        for k, v in counts.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    module = TrainModule(student, obj)
    loss = sum(module(b, out, StepNorm(totals, step=step))[0] for b, out in zip(batches, teacher_outs))
    return loss, gradients(parts, loss)


def gradients(parts: Any, loss: Tensor) -> dict[str, Tensor]:
    params = trained(parts)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)
    return {k: g if g is not None else torch.zeros_like(p) for (k, p), g in zip(params.items(), grads)}


def assert_close_grads(grads: dict[str, Tensor], expected: dict[str, Tensor], rtol: float = RTOL) -> None:
    assert grads.keys() == expected.keys() and len(grads) > 0
    # a parameter whose true gradient is 0 (a key bias under softmax) holds rounding noise on both sides:
    # compare it on the scale of the largest gradient
    floor = 1e-6 * max(float(g.abs().max()) for g in expected.values())
    for k in grads:
        scale = float(expected[k].abs().max())
        torch.testing.assert_close(grads[k], expected[k], rtol=rtol, atol=rtol * max(scale, floor, 1e-12), msg=k)


def assert_twin(parts: Any, loss: Tensor, grads: dict[str, Tensor], twin_loss: Tensor) -> None:
    """Loss and every trained parameter's gradient equal the twin's (rtol 1e-5)."""
    assert twin_loss.dtype == torch.float64
    torch.testing.assert_close(loss, twin_loss, rtol=RTOL, atol=0.0)
    assert_close_grads(grads, gradients(parts, twin_loss))


def assert_split_invariant(parts: Any, step: int = 0, examples: int = 8) -> None:
    """8 x 1 and 2 x 4 (and 1 x 8) make the same update: loss and gradients."""
    whole = list(range(examples))
    loss, grads = implementation(parts, [whole], step)
    for size in (2, 1):
        split, split_grads = implementation(parts, [whole[i:i + size] for i in range(0, examples, size)], step)
        torch.testing.assert_close(split, loss, rtol=1e-9, atol=0.0)
        assert_close_grads(split_grads, grads, rtol=1e-9)


def assert_is_its_formula(parts: Any, twin: Callable[[Any, Any], Tensor], examples: int = 8) -> None:
    """A twin test's whole check: one micro-batch of `examples` against `twin(parts, batch)`, then the split."""
    whole = list(range(examples))
    loss, grads = implementation(parts, [whole])
    assert_twin(parts, loss, grads, twin(parts, parts.train_set.collate(whole)))
    assert_split_invariant(parts, examples=examples)


# ------------------------------------------------------------------------------------------- twin pieces


def forward(model: nn.Module, tokens: Any) -> tuple[Tensor, Tensor]:
    """A causal LM's dense logits [B, T, V] and last hidden states [B, T, d] (plain transformers call)."""
    out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    lm_head = model.get_output_embeddings()
    return lm_head.weight, lm_head.bias


def ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Σ −log softmax(z)[y] over rows: [N, V], [N] -> []."""
    return -torch.log_softmax(logits, -1).gather(-1, labels[:, None]).sum()


def kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Σ_rows KL(softmax(p) ‖ softmax(q)) over rows: [N, V], [N, V] -> []."""
    log_p, log_q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return (log_p.exp() * (log_p - log_q)).sum()


def divergence(name: str, teacher_logits: Tensor, student_logits: Tensor, tau: float) -> Tensor:
    """D(p^τ ‖ q^τ) summed over rows for the divergences the twins use, at their default parameters:
    fkl = KL(p‖q), rkl = KL(q‖p), js = ½KL(p‖m) + ½KL(q‖m) with m = ½(p + q), and akl = w·KL(p‖q) + (1 − w)·KL(q‖p)
    with w = g_head / (g_head + g_tail): Σ|p − q| over the head and the tail, the tail being the tokens of
    lowest p whose cumulative mass (ascending) stays ≤ 0.5."""
    t, s = teacher_logits / tau, student_logits / tau
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    if name == "js":
        m = 0.5 * (p + q)
        return 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    if name == "akl":
        with torch.no_grad():
            p_sorted, order = p.sort(-1)
            tail = p_sorted.cumsum(-1) <= 0.5
            gap = (p - q).abs().gather(-1, order)
            g_tail, g_head = (gap * tail).sum(-1), (gap * ~tail).sum(-1)
            w = g_head / (g_head + g_tail)
        fkl = (p * (p.log() - q.log())).sum(-1)
        rkl = (q * (q.log() - p.log())).sum(-1)
        return (w * fkl + (1 - w) * rkl).sum()
    return {"fkl": lambda: kl(t, s), "rkl": lambda: kl(s, t)}[name]()
