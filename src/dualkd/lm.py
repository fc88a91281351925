"""How dualkd runs a language model: one forward for causal and encoder-decoder models, the LM head's
weight and bias for losses that multiply hidden states by it, and the check that the logits are that product.

Every component (objectives, teachers, the cache writer, evaluation) runs models through these, so every one
sees outputs the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from dualkd.data.collate import ModelBatch
from dualkd.errors import ModelError
from dualkd.losses.cross_entropy import token_cross_entropy
from dualkd.losses.fused import fused_cross_entropy


def config_is_seq2seq(config: Any) -> bool:
    """Whether a transformers model config describes an encoder-decoder model: the one place that asks."""
    return bool(getattr(config, "is_encoder_decoder", False))


def is_seq2seq(model: nn.Module) -> bool:
    """An encoder-decoder model (its encoder reads the prompt, its decoder predicts the response)."""
    return config_is_seq2seq(model.config)


@dataclass
class LMOutput:
    logits: Tensor | None  # [B, T, V]
    hidden: Tensor | None  # [B, T, d] last layer, after the final norm


def lm_forward(model: nn.Module, tokens: ModelBatch, *, hidden: bool = False, logits: bool = True,
               decoder_input_ids: Tensor | None = None, encoder_outputs: Any = None) -> LMOutput:
    """Run a causal LM on a padded batch. `logits=False` (for fused losses) asks transformers to compute the
    LM head on the last position only (`logits_to_keep=1`), so the [B, T, V] logits are never built.

    An encoder-decoder model reads `input_ids` with its encoder and predicts `labels`: its decoder inputs are
    the labels shifted right behind its start token, unless `decoder_input_ids` [B, T] are given (TIE-KD's
    later passes); `encoder_outputs` reuses an encoder pass. Outputs are per target position."""
    if is_seq2seq(model):
        if decoder_input_ids is None:
            decoder_input_ids = model.prepare_decoder_input_ids_from_labels(
                labels=tokens.labels.masked_fill(~tokens.loss_mask, -100))
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, encoder_outputs=encoder_outputs,
                    decoder_input_ids=decoder_input_ids, output_hidden_states=hidden, use_cache=False)
        return LMOutput(logits=out.logits, hidden=out.decoder_hidden_states[-1] if hidden else None)
    kwargs = {} if logits else {"logits_to_keep": 1}
    out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                output_hidden_states=hidden or not logits, use_cache=False, **kwargs)
    return LMOutput(logits=out.logits if logits else None,
                    hidden=out.hidden_states[-1] if hidden or not logits else None)


def response_logprobs(model: nn.Module, tokens: ModelBatch, chunk_size: int | None = None) -> Tensor:
    """Σ_t log p(label_t) over each row's response tokens (+ EOS): [B]. Fused over the vocabulary (no [B, T, V]
    logits); gradients flow when the caller has them on (DPO's policy), not for frozen models."""
    hidden = lm_forward(model, tokens, hidden=True, logits=False).hidden  # [B, T, d]
    ce, _ = through_head(model, lambda head, bias, h: fused_cross_entropy(
        h, head, tokens.labels, bias=bias, mask=tokens.loss_mask, reduction="none", chunk_size=chunk_size),
        hidden)  # [B, T], 0 off the mask
    return -ce.sum(-1)


def gold_cross_entropy(model: nn.Module, tokens: ModelBatch, fused: bool, chunk_size: int | None = None
                       ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The CE of the gold response tokens, summed, the number of them the model ranks first, and the logits
    [B, T, V] (None when `fused`: then the CE is computed from the last hidden states through the head, chunk by
    chunk, never holding [N, V]; only for a linear head). SFT's loss and the loop's CE on a sampled step."""
    mask = tokens.loss_mask
    if fused:
        hidden = lm_forward(model, tokens, hidden=True, logits=False).hidden  # [B, T, d]
        ce, hits = through_head(model, lambda head, bias, h: fused_cross_entropy(
            h, head, tokens.labels[mask], bias=bias, chunk_size=chunk_size), hidden[mask])
        return ce, hits, None
    logits = lm_forward(model, tokens).logits  # [B, T, V]
    ce = token_cross_entropy(logits, tokens.labels, mask)
    hits = ((logits.detach().argmax(-1) == tokens.labels) & mask).sum().float()
    return ce, hits, logits


def through_head(model: nn.Module, fn: Callable[..., Any], *inputs: Any) -> Any:
    """`fn(weight, bias, *inputs)` run as the forward of the model's LM head module, with `head_of`'s weight
    [V, d] and bias [V] | None: what a loss that multiplies hidden states by the head calls it through.

    Engines that shard parameters gather them around a module's forward, never around other code: DeepSpeed
    ZeRO-3's hooks gather the head before this call (and again before its backward, where the gradient of
    the head lands on a whole parameter as for the model's own logits); FSDP2 holds the head whole while the
    unit that owns it (the wrapped module's root) runs its forward, which is where objectives run. Elsewhere
    this is a plain call. `inputs`: the tensors the result depends on with gradients (hidden states), so
    that an engine's backward hooks see them."""
    head = model.get_output_embeddings()
    before = head.__dict__.get("forward")  # an instance forward already there (accelerate's hooks) is kept

    def forward(*args: Any) -> Any:
        weight, bias = head_of(model)
        return fn(weight, bias, *args)

    head.forward = forward  # nn.Module.__call__ runs it between the module's hooks
    try:
        return head(*inputs)
    finally:
        if before is None:
            del head.forward
        else:
            head.forward = before


def head_of(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The LM head's weight [V, d] and bias [V] (or None), for losses that multiply hidden states by it."""
    head = model.get_output_embeddings()
    weight = head.weight
    if not head_is_whole(model):
        raise ModelError("this objective reads the LM head weights where the engine has not gathered them "
                         "(they are partitioned or offloaded: DeepSpeed ZeRO-3, FSDP2, teacher.placement: "
                         "sharded/cpu_offload, read outside `through_head` or the engine's gathering). Keep "
                         "this model whole (teacher.placement: same; DDP or ZeRO-2 for the student), or set "
                         "`objective.fused: off` where the objective has it")
    bias = getattr(head, "bias", None)
    # Marian/BART add a `final_logits_bias` [1, V] buffer after the head: part of the logits, so part of the bias
    extra = getattr(model, "final_logits_bias", None)
    if isinstance(extra, Tensor):
        bias = extra[0, : weight.shape[0]] if bias is None else bias + extra[0, : weight.shape[0]]
    return weight, bias


def head_is_whole(model: nn.Module) -> bool:
    """The LM head's weight is a whole local tensor that a loss can multiply by. ZeRO-3 partitions weights
    (empty tensors here), FSDP2 shards them (DTensor), CPU offload leaves meta tensors: only the model's own
    forward gathers them."""
    weight = model.get_output_embeddings().weight
    return not (weight.numel() == 0 or weight.is_meta or isinstance(weight, DTensor))


def head_is_linear(model: nn.Module) -> bool:
    """Whether the model's logits are last_hidden_state @ head.T (+ bias) (`check_head_is_linear`)."""
    try:
        check_head_is_linear(model, "model")
    except ModelError:
        return False
    return True


@torch.no_grad()
def check_head_is_linear(model: nn.Module, role: str) -> None:
    """The fused losses compute logits as last_hidden @ head.T (+ bias). Models that post-process logits
    (soft-capping, scaling) would silently get a different loss: refuse them with a clear message. A head the
    engine partitions (ZeRO-3, FSDP2, offload) is refused first, by `head_of`'s message: the forward below
    would fail there on partitioned weights with an error that names none of this."""
    head_of(model)
    device = next(model.parameters()).device
    ids = torch.arange(4, device=device)[None] % max(model.get_input_embeddings().num_embeddings, 1)
    was_training = model.training
    model.eval()
    if is_seq2seq(model):
        out = model(input_ids=ids, decoder_input_ids=ids, output_hidden_states=True, use_cache=False)
        last_hidden = out.decoder_hidden_states[-1]
    else:
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        last_hidden = out.hidden_states[-1]
    model.train(was_training)
    weight, bias = head_of(model)
    logits = torch.nn.functional.linear(last_hidden, weight, bias)
    if not torch.allclose(logits.float(), out.logits.float(), atol=1e-3, rtol=1e-3):
        raise ModelError(f"the {role}'s logits are not last_hidden_state @ lm_head (the model post-processes them, "
                         "e.g. logit soft-capping), which the fused losses need")
