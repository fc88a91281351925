"""Batch sources that train on the student's own samples. Both wrap `OffPolicySource`: the gold batches keep
coming in the same order (the gold CE trains on them every step), and some steps add student samples.

`OnPolicySource` (DSKDv2's on-policy mode, GKD's mixing ratio): from step `start` on, a step is a sampled
step with probability `ratio`; the student then samples a response for every prompt of the step.

`ReplaySource` (DistiLLM's adaptive off-policy, arXiv 2402.03898): a probability φ of training on student
samples, starting at `init_threshold` and raised by `threshold_step` whenever the dev loss got worse by
`loss_eps` since the last raise. Of φ, a share decided by `schedule` (φ(1 - t/T) by default) samples fresh
responses, which also go into a bounded buffer; the rest of φ reuses buffered samples (fresh ones are drawn
until the buffer is full).

Deviation from the official code, on purpose: the DSKDv2 and DistiLLM scripts draw per micro-batch and per
process (`np.random`), and DSKDv2 normalizes each micro-batch's KD by its own tokens. Here the draw is made
once per optimizer step from `Random(seed, step)`: every process and a resumed run make the same choice,
FSDP/ZeRO-3 processes all generate together, and a step's loss keeps global denominators (the KD terms
over the sampled tokens of the whole global batch, the CE over the gold tokens). Each micro-batch is still
replaced with probability `ratio`; the draws of one step's micro-batches are shared.
"""

from __future__ import annotations

import random
import zlib
from collections import deque
from typing import Any

from dualkd.config import RunConfig
from dualkd.data.collate import Batch
from dualkd.errors import ConfigError
from dualkd.train.build import Parts
from dualkd.train.rollouts import Rollout, Rollouts
from dualkd.train.samplers import ModelContext, make_sampler
from dualkd.train.sources import OffPolicySource, Step, timed


def draw(seed: int, step: int, what: str) -> float:
    """A uniform [0, 1) number that depends only on (seed, step, what): the same on every process and run."""
    return random.Random(f"{seed}:{step}:{what}").random()


def sampling_seed(seed: int, step: int, rank: int) -> int:
    """The generation seed of one process at one step (different processes sample differently)."""
    return zlib.crc32(f"{seed}:{step}:{rank}:rollout".encode())


class _Wrapped:
    """Delegates the data position to the gold source (what the loop and the checkpoint read)."""

    gold: OffPolicySource
    wants_dev_loss = False

    @property
    def epoch(self) -> int:
        return self.gold.epoch

    @property
    def step_in_epoch(self) -> int:
        return self.gold.step_in_epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.gold.steps_per_epoch

    @property
    def global_batch(self) -> int:
        return self.gold.global_batch

    @property
    def dropped_per_epoch(self) -> int:
        return self.gold.dropped_per_epoch

    rollouts: Rollouts
    seed: int

    def _rollouts_for(self, micro: list[list[int]], step: int, timer: Any) -> list[list[Rollout]]:
        """Sample one response per gold prompt (one generate pass for the whole step), grouped as `micro`."""
        flat = [i for m in micro for i in m]
        with timed(timer, "rollout"):
            made = self.rollouts.sample(flat, seed=sampling_seed(self.seed, step, self.gold.rank), step=step)
        out, k = [], 0
        for m in micro:
            out.append(made[k:k + len(m)])
            k += len(m)
        return out

    def observe_dev_loss(self, loss: float) -> None:
        pass

    def upcoming(self) -> list[Batch]:
        """Nothing: the next step's teacher inputs are samples not drawn yet."""
        return []

    def rank_state_dict(self) -> dict[str, Any] | None:
        return None

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        pass


class OnPolicySource(_Wrapped):
    def __init__(self, gold: OffPolicySource, rollouts: Rollouts, ratio: float, start_step: int, seed: int):
        self.gold, self.rollouts, self.ratio, self.start_step, self.seed = gold, rollouts, ratio, start_step, seed

    def is_sampled_step(self, step: int) -> bool:
        return step >= self.start_step and draw(self.seed, step, "on_policy") < self.ratio

    def next_step(self, timer: Any = None) -> Step:
        step = self.gold.steps_done
        micro = self.gold.next_indices()
        with timed(timer, "data"):
            gold = [self.gold.dataset.collate(m) for m in micro]
        if not self.is_sampled_step(step):
            return Step(gold=gold)
        groups = self._rollouts_for(micro, step, timer)
        with timed(timer, "data"):
            sampled = [self.rollouts.collate(g) for g in groups]
        return Step(gold=gold, sampled=sampled, kind="fresh")

    def state_dict(self) -> dict[str, Any]:
        return self.gold.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gold.load_state_dict(state)


class ReplaySource(_Wrapped):
    wants_dev_loss = True

    def __init__(self, gold: OffPolicySource, rollouts: Rollouts, seed: int, total_steps: int, capacity: int,
                 init_threshold: float, threshold_step: float, loss_eps: float, schedule: str):
        self.gold, self.rollouts, self.seed, self.total_steps = gold, rollouts, seed, max(total_steps, 1)
        self.threshold_step, self.loss_eps, self.schedule = threshold_step, loss_eps, schedule
        self.capacity = capacity
        self.threshold = init_threshold
        """φ: the probability of a step on student samples (fresh or replayed)."""
        self.last_dev_loss: float | None = None
        self.buffer: deque[Rollout] = deque(maxlen=capacity)

    def fresh_probability(self, step: int) -> float:
        t = step / self.total_steps
        share = {"decreasing": 1.0 - t, "constant": 0.5, "increasing": t}[self.schedule]
        return self.threshold * share

    def choose(self, step: int) -> str:
        """gold | fresh | replay for this step (the same on every process: buffers fill in lockstep)."""
        u = draw(self.seed, step, "replay")
        full = len(self.buffer) >= self.capacity
        if u < self.fresh_probability(step) or (u < self.threshold and not full):
            return "fresh"
        return "replay" if u < self.threshold else "gold"

    def next_step(self, timer: Any = None) -> Step:
        step = self.gold.steps_done
        micro = self.gold.next_indices()
        with timed(timer, "data"):
            gold = [self.gold.dataset.collate(m) for m in micro]
        kind = self.choose(step)
        if kind == "gold":
            return Step(gold=gold)
        if kind == "fresh":
            groups = self._rollouts_for(micro, step, timer)
            self.buffer.extend(r for g in groups for r in g)
        else:
            groups = self._from_buffer(step, [len(m) for m in micro])
        with timed(timer, "data"):
            sampled = [self.rollouts.collate(g) for g in groups]
        return Step(gold=gold, sampled=sampled, kind=kind)

    def _from_buffer(self, step: int, sizes: list[int]) -> list[list[Rollout]]:
        rng = random.Random(f"{self.seed}:{step}:{self.gold.rank}:pick")
        items = list(self.buffer)  # a deque indexes in O(n); one copy per draw
        picked = [items[j] for j in rng.sample(range(len(items)), k=sum(sizes))]
        picked.sort(key=lambda r: len(r.student.ids))  # similar lengths share a micro-batch: less padding
        out, k = [], 0
        for n in sizes:
            out.append(picked[k:k + n])
            k += n
        return out

    def observe_dev_loss(self, loss: float) -> None:
        """DistiLLM's rule: raise φ when the dev loss is worse than at the last raise (or the start) by ε."""
        if self.last_dev_loss is None:
            self.last_dev_loss = loss
        elif loss >= self.last_dev_loss + self.loss_eps:
            self.threshold = min(self.threshold + self.threshold_step, 1.0)
            self.last_dev_loss = loss

    def state_dict(self) -> dict[str, Any]:
        return {**self.gold.state_dict(), "threshold": self.threshold, "last_dev_loss": self.last_dev_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gold.load_state_dict(state)
        self.threshold, self.last_dev_loss = state["threshold"], state["last_dev_loss"]

    def rank_state_dict(self) -> dict[str, Any]:
        return {"buffer": [r.to_json() for r in self.buffer]}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = deque((Rollout.from_json(r) for r in state["buffer"]), maxlen=self.capacity)


def make_source(cfg: RunConfig, parts: Parts, gold: OffPolicySource, model_fn: ModelContext, total_steps: int
                ) -> OffPolicySource | OnPolicySource | ReplaySource:
    """The run's batch source (`source.kind`); `model_fn` is a context manager yielding the student to sample
    from (engine-aware)."""
    src = cfg.source
    if src.kind in ("off_policy", "seqkd"):  # seqkd: the dataset already holds the teacher's outputs
        return gold
    # an objective whose terms samples cannot train was refused before anything loaded (train/build.py)
    per_rank = gold.micro_batch_size * gold.grad_accum
    sampler = make_sampler(cfg, model_fn, parts.student_tokenizer, per_rank)
    rollouts = Rollouts(parts.train_set, sampler, parts.student_tokenizer, parts.teacher_tokenizer, parts.aligner,
                        cfg.data.max_length, cfg.data.pad_to_multiple_of)
    if src.kind == "on_policy":
        start = src.on_policy_after * (gold.steps_per_epoch if src.on_policy_after_unit == "epochs" else 1)
        return OnPolicySource(gold, rollouts, src.student_gen_ratio, start, cfg.seed)
    if src.replay_capacity < per_rank:
        raise ConfigError(f"source.replay_capacity ({src.replay_capacity}) must hold at least one step of this "
                          f"process's examples ({per_rank} = micro_batch_size x grad_accum)")
    return ReplaySource(gold, rollouts, cfg.seed, total_steps, src.replay_capacity, src.replay_init_threshold,
                        src.replay_threshold_step, src.replay_loss_eps, src.replay_schedule)
