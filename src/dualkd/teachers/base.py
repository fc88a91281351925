"""The teacher as a component: what objectives read of a frozen model, whoever produces it.

An objective never holds the teacher model; in `teacher_forward` it asks a `Teacher` for one of these
(each a named capability, `CAPABILITIES`):

    hidden(tokens)                     [B, T, d]  last hidden states at every position        (live; hidden server)
    response_hidden(tokens, indices)   [N, d]     the same at the N response positions,
                                                  in `loss_mask` order (row-major)           (+ cache --hidden)
    head()                             W [V, d], b [V] | None: the LM head, a linear one
                                                  (logits = h W^T + b, checked)              (same)
    topk(tokens, indices, k, vocab)    TopKTargets at the N response positions               (every kind)
    logits(tokens, decoder_input_ids)  [B, T, V]  for the batch or for given decoder inputs  (live)
    embeddings(ids)                    [..., d]   its input embeddings of token ids           (live)
    sequence_logprobs(tokens)          [B]        each row's summed log-probability of its
                                                  response tokens                            (live)
    encode(tokens)                     encoder outputs to reuse across decoder passes        (live, seq2seq)
    generate(examples, settings, ...)  one response per example (SeqKD)                      (live; servers)

`tokens` is the teacher's view of a batch (`Batch.teacher_view`), `indices` the examples' dataset indices
(what a cache reads by). Every call runs without gradients; a live teacher also runs under the engine's
autocast and is timed as "teacher", wherever an objective calls it (TIE-KD calls it inside its loss).

Implementations: `LiveTeacher` (a model on this machine: teachers/live.py), `CachedTeacher` (an offline
cache written by `dualkd cache-teacher`: teachers/cached.py), `ServedTeacher` (an inference server that
returns top-k log-probabilities of given tokens: teachers/served.py) and `ServedHiddenTeacher` (a server that
returns last hidden states, the LM head applied here: teachers/served_hidden.py), each opened from its config
section by `open_teacher` (teachers/spec.py). Before each step the loop hands the teacher the micro-batches it will ask
about (`prefetch`), so a teacher with latency can work ahead. Each objective says in `setup` what it reads
(`require`), and a teacher that cannot serve it is refused there, before training, with the objective's name
in the message. The engine sees a teacher's local modules only to place, gather and count them (`modules`).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dualkd.data.collate import ModelBatch
from dualkd.data.formats import Example
from dualkd.errors import ConfigError
from dualkd.generate import GenerationConfig
from dualkd.losses.sparse import TopKTargets

CAPABILITIES = {
    "hidden": "hidden states at every position",
    "response_hidden": "hidden states at the response positions",
    "head": "LM head",
    "topk": "top-k log-probabilities",
    "logits": "full-vocabulary logits",
    "embeddings": "input embeddings",
    "sequence_logprobs": "log-probabilities of whole responses",
    "encoder": "encoder passes",
    "generate": "written responses",
    "members": "separate teachers' outputs (teacher.kind: several)",
}


class Teacher(ABC):
    """A frozen model's outputs, as objectives read them (see the module docstring)."""

    provides: ClassVar[frozenset[str]]
    """What this kind of teacher can return (keys of CAPABILITIES)."""
    what: ClassVar[str]
    """How the teacher is named in messages (`a live teacher`, `an offline teacher cache`)."""
    works_ahead: ClassVar[bool] = False
    """Whether `prefetch` does anything (the loop collates the next step's batches for it only then)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    @property
    def identity(self) -> str | None:
        """What the teacher is, by content, where its config cannot say (a served model: the server's answers
        on a probe); part of the resume key. None: the config's weights identity covers it."""
        return None

    @property
    def k(self) -> int | None:
        """The number of top-k entries this teacher is limited to (a cache holds exactly k); None: any k."""
        return None

    @property
    @abstractmethod
    def vocab_rows(self) -> int:
        """Rows of the teacher's LM head (its vocabulary size, padding included)."""

    def modules(self) -> list[nn.Module]:
        """The frozen modules this teacher runs on this machine, for the engine only (gathered whole for the
        objective's setup under ZeRO-3, counted in the start-up line); objectives read capabilities."""
        return []

    @abstractmethod
    def describe(self, count_parameters: Callable[[nn.Module], int]) -> str:
        """What the teacher is, for the start-up line (`count_parameters`: the engine's, which counts
        partitioned weights whole)."""

    def attach(self, device: torch.device, place: Callable[[nn.Module, str], nn.Module],
               autocast: Callable[[], contextlib.AbstractContextManager], timer: Any = None,
               gather_head: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None) -> None:
        """Before training: where the teacher runs. `place(model, placement)` puts a model where its
        `placement` says (the engine's job); `autocast` and `timer` (StepTimer) wrap every call of a live
        teacher; `gather_head` makes the LM head of a placed model whole for a while (the engine's, where it
        shards the teacher). A teacher that runs nothing here has nothing to attach."""
        return None

    def for_split(self, split: str) -> Teacher:
        """The teacher of one data split ("train", "dev"): a cache reads each split's own files."""
        return self

    def prefetch(self, batches: list[ModelBatch]) -> None:
        """The teacher views of micro-batches about to be asked for (this step's and the next step's): a teacher
        that works ahead (a served one) starts on them; the others need nothing."""
        return None

    def interrupt(self) -> None:
        """SIGTERM/SIGINT arrived: a teacher that waits on others (a server) stops waiting, so that the loop can
        checkpoint and stop now; a local one has nothing to cut short."""
        return None

    def close(self) -> None:
        """After training: release what the teacher holds beyond the model (threads, connections)."""
        return None

    def require(self, needs: set[str], who: str) -> None:
        """Refuse, before training, an objective that reads what this teacher cannot return."""
        for need in sorted(needs):
            if need not in self.provides:
                raise self._refuse(need, who)

    def _refuse(self, need: str, who: str) -> ConfigError:
        by = f"{who} reads " if who else "this needs "
        can = ", ".join(CAPABILITIES[c] for c in sorted(self.provides))
        return ConfigError(f"{by}the teacher's {CAPABILITIES[need]}, which {self.what} cannot give (it gives: "
                           f"{can}); use a live teacher (`teacher.path`) for it")

    def hidden(self, tokens: ModelBatch) -> Tensor:
        raise self._refuse("hidden", "")

    def response_hidden(self, tokens: ModelBatch, indices: list[int]) -> Tensor:
        raise self._refuse("response_hidden", "")

    def head(self) -> tuple[Tensor, Tensor | None]:
        raise self._refuse("head", "")

    def topk(self, tokens: ModelBatch, indices: list[int], k: int, vocab_size: int,
             chunk_size: int | None = None) -> TopKTargets:
        raise self._refuse("topk", "")

    def logits(self, tokens: ModelBatch, decoder_input_ids: Tensor | None = None, encoder_outputs: Any = None
               ) -> Tensor:
        raise self._refuse("logits", "")

    def embeddings(self, ids: Tensor) -> Tensor:
        raise self._refuse("embeddings", "")

    def sequence_logprobs(self, tokens: ModelBatch, chunk_size: int | None = None) -> Tensor:
        raise self._refuse("sequence_logprobs", "")

    def encode(self, tokens: ModelBatch) -> Any:
        raise self._refuse("encoder", "")

    def generate(self, examples: list[Example], settings: GenerationConfig, seed: int, label: str,
                 progress: bool | None = None) -> list[str]:
        """One response per example (greedy unless `settings.do_sample`), as SeqKD trains on them."""
        raise self._refuse("generate", "")


def response_rows(mask: Tensor, batch_index: Tensor, position: Tensor) -> Tensor:
    """The row, in `response_hidden`'s order, of each (batch_index, position) pair [P]; every pair must lie on
    the mask [B, T] (aligned positions are response positions)."""
    row = mask.flatten().long().cumsum(0).view(mask.shape) - 1  # [B, T] row of each response position
    if not bool(mask[batch_index, position].all()):
        raise ValueError("a paired teacher position lies outside the response")
    return row[batch_index, position]
