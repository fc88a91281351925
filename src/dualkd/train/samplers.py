"""Samplers: the student generating responses during training (on-policy and replay sources).

    sampler = make_sampler(cfg, model_fn, tokenizer)     # model_fn: a context manager yielding the student
    samples = sampler([[1, 52, 7], [1, 9]], seed=123, step=40)   # [Sample(ids=[...], ended=True), ...]

- `hf` (default): `dualkd.generate.sample_token_ids`, batched Hugging Face `generate` with the KV cache,
  in eval mode on a forked RNG (training's dropout masks and RNG streams are untouched), no autograd.
- `vllm`: a vLLM engine beside the trainer on the same GPU, its weights refreshed from the student every
  `vllm_sync_every` steps. Needs `pip install vllm` and a CUDA GPU; refused with a clear message otherwise.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from dualkd.config import GenerationConfig, RunConfig
from dualkd.data.dataset import pad_id
from dualkd.errors import ConfigError
from dualkd.generate import sample_token_ids

ModelContext = Callable[[], contextlib.AbstractContextManager[nn.Module]]


@dataclass
class Sample:
    ids: list[int]
    """Generated tokens, without the EOS."""
    ended: bool
    """True when the student emitted EOS (False: cut by the length budget)."""


class Sampler(Protocol):
    def __call__(self, prompts: list[list[int]], seed: int, step: int) -> list[Sample]: ...


def sampling_settings(cfg: RunConfig, batch_size: int) -> GenerationConfig:
    """The generation settings of student sampling: the source's temperature/top-p/top-k, pure sampling (no
    n-gram blocking), responses up to `data.max_length` for prompt + response."""
    src, data = cfg.source, cfg.data
    max_prompt = data.max_prompt_length or data.max_length - 1
    return GenerationConfig(max_length=data.max_length, max_prompt_length=max_prompt,
                            max_new_tokens=src.max_new_tokens or data.max_length, do_sample=True,
                            temperature=src.temperature, top_p=src.top_p, top_k=src.top_k, no_repeat_ngram_size=0,
                            num_beams=1, batch_size=src.rollout_batch_size or batch_size)


class HFSampler:
    def __init__(self, model_fn: ModelContext, settings: GenerationConfig, pad: int, eos: int | None):
        self.model_fn, self.settings, self.pad, self.eos = model_fn, settings, pad, eos

    def __call__(self, prompts: list[list[int]], seed: int, step: int) -> list[Sample]:
        with self.model_fn() as model:
            out = sample_token_ids(model, prompts, self.settings, self.pad, self.eos, seed=seed, keep_eos=True)
        return [_sample(ids, self.eos) for ids in out]


def _sample(ids: list[int], eos: int | None) -> Sample:
    ended = eos is not None and bool(ids) and ids[-1] == eos
    return Sample(ids=list(ids[:-1]) if ended else list(ids), ended=ended)


class VLLMSampler:
    """vLLM in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), started from a copy of the student and fed
    its current weights through the model's `load_weights` every `sync_every` steps."""

    def __init__(self, model_fn: ModelContext, tokenizer: Any, settings: GenerationConfig, sync_every: int,
                 gpu_memory_utilization: float, seed: int):
        check_vllm_available()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine must be reachable in-process
        self.model_fn, self.tokenizer, self.settings = model_fn, tokenizer, settings
        self.sync_every, self.gpu_memory_utilization, self.seed = sync_every, gpu_memory_utilization, seed
        self.eos = tokenizer.eos_token_id
        self.llm: Any = None  # started at the first sampling step, from the weights the student has then
        self._synced_step = 0

    def _start(self) -> None:
        from vllm import LLM

        self._dir = tempfile.TemporaryDirectory(prefix="dualkd-vllm-")
        with self.model_fn() as model:
            if hasattr(model, "peft_config"):
                raise ConfigError("source.backend=vllm does not take LoRA students (the engine needs merged "
                                  "weights at every sync); use source.backend=hf")
            model.save_pretrained(self._dir.name, safe_serialization=True)
            self.tokenizer.save_pretrained(self._dir.name)
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.llm = LLM(model=self._dir.name, dtype=dtype, seed=self.seed, max_model_len=self.settings.max_length,
                       gpu_memory_utilization=self.gpu_memory_utilization, enable_prefix_caching=True)

    def _sync(self, step: int) -> None:
        if self.llm is None:
            self._start()
        elif step - self._synced_step >= self.sync_every:
            with self.model_fn() as model, torch.no_grad():
                _engine_model(self.llm).load_weights(((k, v) for k, v in model.state_dict().items()))
            self.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights
        else:
            return
        self._synced_step = step

    def __call__(self, prompts: list[list[int]], seed: int, step: int) -> list[Sample]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._sync(step)
        s = self.settings
        params = [SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or -1,
                                 max_tokens=max(1, min(s.max_new_tokens or s.max_length, s.max_length - len(p))),
                                 seed=seed + k) for k, p in enumerate(prompts)]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        samples = []
        for out in outs:
            ids = list(out.outputs[0].token_ids)
            if out.outputs[0].finish_reason == "stop" and (not ids or ids[-1] != self.eos):
                ids.append(self.eos)  # stopped on EOS without returning it
            samples.append(_sample(ids, self.eos))
        return samples


def _engine_model(llm: Any) -> Any:
    """The torch module inside an in-process vLLM engine (the attribute path differs between versions)."""
    executor = llm.llm_engine.model_executor
    worker = executor.driver_worker
    for path in (("worker", "model_runner", "model"), ("model_runner", "model")):
        node = worker
        for name in path:
            node = getattr(node, name, None)
        if node is not None and hasattr(node, "load_weights"):
            return node
    raise ConfigError("cannot reach the model inside this vLLM version to sync weights; use source.backend=hf")


def check_vllm_available() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("source.backend=vllm: vLLM is not installed (`pip install vllm`, CUDA only); "
                          "use source.backend=hf")
    if not torch.cuda.is_available():
        raise ConfigError("source.backend=vllm needs a CUDA GPU; this machine has none: use source.backend=hf")


def make_sampler(cfg: RunConfig, model_fn: ModelContext, tokenizer: Any, batch_size: int) -> Sampler:
    settings = sampling_settings(cfg, batch_size)
    if cfg.source.backend == "vllm":
        return VLLMSampler(model_fn, tokenizer, settings, cfg.source.vllm_sync_every,
                           cfg.source.vllm_gpu_memory_utilization, cfg.seed)
    return HFSampler(model_fn, settings, pad_id(tokenizer), tokenizer.eos_token_id)
