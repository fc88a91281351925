"""Batch sources: where the batches of the one loop come from.

`OffPolicySource` serves dataset responses. The order of each epoch is a pure function of (seed, epoch),
built as *global* batches (micro_batch_size x grad_accum x processes examples) that are then split into
micro-batches for each process. Consequences:
- 8x1 on one process, 2x4 on one process and 2x2 on two processes see the same examples in each step;
- the data position is just (epoch, step in epoch): resuming rebuilds the epoch and skips what was done.
With length bucketing, examples of similar length share a global batch (less padding); the order of the
global batches is shuffled so the schedule does not see lengths sorted.

Every source hands the loop a `Step`: the gold micro-batches, and on a student-sampled step (train/on_policy.py)
their sampled twins. Sources charge their time to the step timer's "data" (and "rollout") sections.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field

from dualkd.data.collate import Batch
from dualkd.data.dataset import TokenizedDataset
from dualkd.errors import DataError
from dualkd.schema import HomePath, StrictModel


class OffPolicyConfig(StrictModel):
    """`source: {kind: off_policy}` (the default): the dataset's responses."""

    kind: Literal["off_policy"] = "off_policy"


class SamplingConfig(StrictModel):
    """How the student samples, for the sources that train on its samples (on-policy, replay)."""

    temperature: float = Field(1.0, gt=0)
    """Student sampling temperature (DSKDv2 samples like its evaluation: 1.0, no top-p, no top-k)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Student sampling nucleus threshold (1.0: off)."""
    top_k: int = Field(0, ge=0)
    """Student sampling top-k (0: off)."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Cap on sampled tokens (None: up to `data.max_length` for prompt + response)."""
    rollout_batch_size: int | None = Field(None, ge=1)
    """Prompts per generate call (None: all of this process's prompts of the step at once)."""
    backend: Literal["hf", "vllm"] = "hf"
    """Sampling engine: Hugging Face `generate` (KV cache), or vLLM (GPU, `pip install vllm`)."""
    vllm_sync_every: int = Field(1, ge=1)
    """vllm: copy the student's weights into the vLLM engine every N optimizer steps."""
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, lt=1)
    """vllm: share of the GPU memory vLLM may take (the rest is the trainer's)."""


class OnPolicyConfig(SamplingConfig):
    """`source: {kind: on_policy}` (DSKDv2, GKD; train/on_policy.py): after `on_policy_after`, each step is
    replaced by student samples for its prompts with probability `student_gen_ratio`."""

    kind: Literal["on_policy"] = "on_policy"
    student_gen_ratio: float = Field(0.5, ge=0.0, le=1.0)
    """Probability that a step trains on student samples (DSKDv2 `--stu-gen-ratio`: 0.5)."""
    on_policy_after: int = Field(0, ge=0)
    """Off-policy warm-up before sampling starts, in `on_policy_after_unit`s (DSKDv2: 3 epochs)."""
    on_policy_after_unit: Literal["epochs", "steps"] = "epochs"
    """Unit of `on_policy_after`."""


class ReplayConfig(SamplingConfig):
    """`source: {kind: replay}` (DistiLLM; train/on_policy.py): an adaptive off-policy replay buffer of student
    samples; the probability φ of a sampled step rises when the dev loss gets worse."""

    kind: Literal["replay"] = "replay"
    replay_capacity: int = Field(1000, ge=1)
    """Sampled examples kept per process (DistiLLM: 1000)."""
    replay_init_threshold: float = Field(0.0, ge=0.0, le=1.0)
    """The starting probability φ of training on student samples (DistiLLM: 0.0)."""
    replay_threshold_step: float = Field(0.1, gt=0.0, le=1.0)
    """How much φ rises when the dev loss got worse by `replay_loss_eps` (DistiLLM: 0.1)."""
    replay_loss_eps: float = Field(0.1, ge=0.0)
    """Dev-loss increase that raises φ (DistiLLM: 0.1)."""
    replay_schedule: Literal["decreasing", "constant", "increasing"] = "decreasing"
    """Share of φ spent on fresh samples over training: φ(1 - t/T) (DistiLLM's default), φ/2, or φ·t/T; the
    rest of φ reuses the buffer."""


class SeqKDConfig(StrictModel):
    """`source: {kind: seqkd}` (Kim & Rush; train/seqkd.py): train on teacher responses generated ahead of time."""

    kind: Literal["seqkd"] = "seqkd"
    seqkd_data: HomePath | None = None
    """The teacher-generated training set (jsonl from `dualkd generate`). When the file does not exist the
    teacher writes it there before training (default `<output_dir>/seqkd-train.jsonl`)."""
    seqkd_sampling: bool = False
    """Sample the teacher's outputs with the `generation` settings (temperature, top-p). Off (Kim & Rush): the
    teacher decodes greedily, or with beam search when `generation.num_beams` > 1."""


SourceConfig = Annotated[OffPolicyConfig | OnPolicyConfig | ReplayConfig | SeqKDConfig, Field(discriminator="kind")]
"""Where the training batches come from; `kind` chooses, and decides which other keys are allowed. The loss is
the objective's either way; on a student-sampled step the gold CE stays on the dataset responses."""


def source_defaults(data: Any) -> Any:
    """A `source` mapping without `kind` is the default kind, off_policy; the keys of an older layout are
    refused with where they went (a before-validator of the run config)."""
    if not isinstance(data, dict):
        return data
    if data.get("kind") == "cache" or "cache_dir" in data:
        raise ValueError("an offline teacher cache is now where the teacher comes from: replace `source.kind: "
                         "cache` and `source.cache_dir: DIR` by `teacher: {cache: DIR}`")
    return {"kind": "off_policy", **data}


@dataclass
class Step:
    """This process's micro-batches for one optimizer step."""

    gold: list[Batch]
    """Dataset micro-batches: the gold CE (and, off-policy, the whole objective) trains on them."""
    sampled: list[Batch] | None = None
    """On a student-sampled step, one batch of student samples per gold micro-batch (trained with
    `StepNorm.ce_weight` 0): the objective's distillation terms train on these, normalized by their own counts."""
    kind: str = "gold"
    """gold | fresh (sampled this step) | replay (drawn from the replay buffer)."""


def timed(timer: Any, name: str) -> contextlib.AbstractContextManager:
    return timer.section(name) if timer is not None else contextlib.nullcontext()


_BUCKET_SPAN = 32  # global batches per length-sorted chunk: wide enough to group lengths, small enough to mix


class OffPolicySource:
    wants_dev_loss = False
    """Sources that adapt to the dev loss (replay) get `observe_dev_loss` calls from the loop."""

    def __init__(
        self,
        dataset: TokenizedDataset,
        micro_batch_size: int,
        grad_accum: int,
        world_size: int,
        rank: int,
        seed: int,
        bucket_by_length: bool = True,
        micro_batch_tokens: int | None = None,
    ):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.bucket_by_length = bucket_by_length
        self.global_batch = micro_batch_size * grad_accum * world_size
        self.steps_per_epoch = len(dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"the training set has {len(dataset)} examples, fewer than one global batch "
                            f"({micro_batch_size} x {grad_accum} x {world_size} processes = {self.global_batch})")
        self.epoch = 0
        self.step_in_epoch = 0
        self._order: list[list[int]] | None = None

    @property
    def dropped_per_epoch(self) -> int:
        """Examples left out of each epoch because they do not fill a last global batch (reshuffled each epoch)."""
        return len(self.dataset) - self.steps_per_epoch * self.global_batch

    def epoch_order(self, epoch: int) -> list[list[int]]:
        """The global batches of `epoch`, each sorted by length so that micro-batches pad little."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        perm = list(range(len(self.dataset)))
        rng.shuffle(perm)
        G = self.global_batch
        lengths = self.dataset.lengths
        if self.bucket_by_length:
            span = G * _BUCKET_SPAN
            chunks = [sorted(perm[i:i + span], key=lambda j: lengths[j]) for i in range(0, len(perm), span)]
            perm = [j for chunk in chunks for j in chunk]
        batches = [perm[i:i + G] for i in range(0, self.steps_per_epoch * G, G)]
        if self.bucket_by_length:
            rng.shuffle(batches)
        return [sorted(b, key=lambda j: (lengths[j], j)) for b in batches]

    @property
    def steps_done(self) -> int:
        """Optimizer steps taken from this source so far (over all epochs)."""
        return self.epoch * self.steps_per_epoch + self.step_in_epoch

    def next_indices(self) -> list[list[int]]:
        """Dataset indices of this process's micro-batches for the next optimizer step."""
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        global_batch = self._order[self.step_in_epoch]
        per_rank = self.micro_batch_size * self.grad_accum
        shares = [global_batch[r * per_rank:(r + 1) * per_rank] for r in range(self.world_size)]
        if self.micro_batch_tokens is None:
            mine = shares[self.rank]
            micro = [mine[i:i + self.micro_batch_size] for i in range(0, per_rank, self.micro_batch_size)]
        else:
            micro = token_budget_split(shares, self.dataset.lengths, self.micro_batch_tokens)[self.rank]
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch, self._order = self.epoch + 1, 0, None
        return micro

    def next_step(self, timer: Any = None) -> Step:
        with timed(timer, "data"):
            return Step(gold=[self.dataset.collate(m) for m in self.next_indices()])

    def upcoming(self) -> list[Batch]:
        """This process's micro-batches of the next step, without taking them (for a teacher that works ahead)."""
        saved = (self.epoch, self.step_in_epoch, self._order)
        try:
            return [self.dataset.collate(m) for m in self.next_indices()]
        finally:
            self.epoch, self.step_in_epoch, self._order = saved

    def observe_dev_loss(self, loss: float) -> None:
        """Off-policy data does not adapt."""

    def rank_state_dict(self) -> dict[str, Any] | None:
        """State private to this process (saved per rank in checkpoints); None when there is none."""
        return None

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step_in_epoch, self._order = state["epoch"], state["step_in_epoch"], None


def token_budget_split(shares: list[list[int]], lengths: Any, budget: int) -> list[list[list[int]]]:
    """Each process's share of a global batch (dataset indices sorted by length) cut into micro-batches of at
    most `budget` padded tokens (examples x the longest; an example longer than the budget goes alone), then
    the shares with fewer micro-batches split further (the biggest in halves) until every process has as
    many: a pure function of the batch, so every process computes the same counts without talking."""
    splits = []
    for share in shares:
        micro: list[list[int]] = []
        for j in share:  # ascending lengths: the example added is the longest of its micro-batch
            if micro and (len(micro[-1]) + 1) * lengths[j] <= budget:
                micro[-1].append(j)
            else:
                micro.append([j])
        splits.append(micro)
    most = max(len(m) for m in splits)
    for micro in splits:
        while len(micro) < most:
            k = max(range(len(micro)), key=lambda i: (len(micro[i]) * max(lengths[j] for j in micro[i]), -i))
            assert len(micro[k]) > 1, "shares are equal in size, so one can always be split to as many passes"
            half = len(micro[k]) // 2
            micro[k:k + 1] = [micro[k][:half], micro[k][half:]]
    return splits


def eval_batches(dataset: TokenizedDataset, batch_size: int, world_size: int, rank: int, same_count: bool = False
                 ) -> Iterator[tuple[Batch, bool]]:
    """The dev set in a fixed, length-sorted order; process `rank` takes every `world_size`-th batch. Yields
    (batch, counts). With `same_count` every process runs as many batches as the busiest one, the extra ones
    repeating a batch that counts for nothing: engines that shard parameters (ZeRO-3, FSDP2) gather them in
    every forward, so all processes must run the same number of forwards."""
    order = sorted(range(len(dataset)), key=lambda j: (dataset.lengths[j], j))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mine = chunks[rank::world_size]
    for chunk in mine:
        yield dataset.collate(chunk), True
    if same_count and chunks:
        busiest = len(chunks[0::world_size])
        for _ in range(busiest - len(mine)):
            yield dataset.collate(chunks[0]), False
