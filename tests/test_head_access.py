"""How losses reach LM heads that an engine may shard: `lm.through_head` runs a loss as the head module's forward
(where ZeRO-3's and FSDP2's hooks gather it), and a live teacher gathers its head through the engine once and
shares the copy while someone holds it. The engines themselves are exercised in tests/test_distributed.py."""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dualkd.lm import head_of, through_head
from dualkd.teachers import LiveTeacher
from tests.helpers import make_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, byte_tokenizer_dir: Path) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("heads"), byte_tokenizer_dir, seed=4)


def test_through_head_runs_between_the_head_modules_hooks(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    head = model.get_output_embeddings()
    seen: list[str] = []
    head.register_forward_pre_hook(lambda module, args: seen.append("pre"))  # where an engine gathers
    head.register_forward_hook(lambda module, args, out: seen.append("post"))  # where it releases
    hidden = torch.randn(5, head.in_features, requires_grad=True)

    def loss(weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        seen.append("loss")
        return torch.nn.functional.linear(h, weight, bias).logsumexp(-1).sum()

    value = through_head(model, loss, hidden)
    assert seen == ["pre", "loss", "post"]
    expected = torch.nn.functional.linear(hidden, *head_of(model)).logsumexp(-1).sum()
    torch.testing.assert_close(value, expected)
    value.backward()  # the gradient reaches the head weight as through the model's own logits
    assert head.weight.grad is not None and hidden.grad is not None
    assert "forward" not in head.__dict__  # the module's own forward is back


def test_through_head_keeps_an_instance_forward_already_there(model_dir: Path) -> None:
    """accelerate's hooks (CPU offload) replace a module's forward with an instance attribute: kept after."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    head = model.get_output_embeddings()
    wrapped = head.forward
    head.forward = wrapped  # an instance attribute, as accelerate's `add_hook_to_module` leaves
    through_head(model, lambda w, b, h: h @ w.T, torch.randn(2, head.in_features))
    assert head.__dict__["forward"] is wrapped


def test_a_live_teacher_gathers_its_head_once_while_held(model_dir: Path, byte_tokenizer_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    teacher = LiveTeacher(model, AutoTokenizer.from_pretrained(byte_tokenizer_dir))
    gathers: list[int] = []

    @contextlib.contextmanager
    def gather(m: torch.nn.Module):  # stands in for the engine's: the weight whole only inside
        gathers.append(1)
        yield

    teacher.attach(torch.device("cpu"), lambda m, placement: m, contextlib.nullcontext, gather_head=gather)
    full = model.get_output_embeddings().weight
    assert teacher.head()[0] is full and not gathers  # a whole head is read as is
    stored = full.data
    full.data = torch.empty(0)  # partitioned, as ZeRO-3 leaves it between forwards

    @contextlib.contextmanager
    def gather_whole(m: torch.nn.Module):
        gathers.append(1)
        full.data = stored
        try:
            yield
        finally:
            full.data = torch.empty(0)

    teacher._gather_head = gather_whole
    first, _ = teacher.head()
    again, _ = teacher.head()
    assert len(gathers) == 1 and again is first  # the micro-batches of a step share one copy
    torch.testing.assert_close(first, stored)
    assert first.data_ptr() != stored.data_ptr()  # a copy: the gathered weight is released after
    del first, again
    gc.collect()
    teacher.head()
    assert len(gathers) == 2  # nobody held it: gathered again
