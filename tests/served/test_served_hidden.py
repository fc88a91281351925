"""A served teacher that ships hidden states (`kind: hidden_server`), against a real server started by the test:
`dualkd serve-teacher` (llama.cpp's Python server plus the hidden-state route) on the SmolLM2-135M-Instruct
GGUF, its LM head loaded from the dequantized float32 folder (the same weights)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dualkd.config import validate_config
from dualkd.errors import DualKDError
from dualkd.teachers.server_client import ServerClient
from dualkd.train.loop import train
from tests.helpers import LocalServer, needs_real_models, read_metrics, synthetic_records, tiny_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(gguf: Path) -> Iterator[LocalServer]:
    running = LocalServer(lambda port: [sys.executable, "-m", "dualkd.cli", "serve-teacher", str(gguf), "--port",
                                        str(port), "--n-ctx", "1024", "--threads", "2"]).start()
    yield running
    running.kill()


def test_the_served_hidden_states_are_the_live_models(server: LocalServer, smollm2: Path) -> None:
    """The server's h at every position vs the dequantized model's last hidden state (after the final norm),
    and the distributions h W^T gives: they differ by the server's quantized arithmetic only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    record = synthetic_records(1, seed=3)[0]
    text = tokenizer.apply_chat_template([{"role": "user", "content": record["prompt"]},
                                          {"role": "assistant", "content": record["output"]}], tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # chat special tokens: no text round trip
    client = ServerClient(server.url, tokenizer, timeout_s=60, retries=0, backoff_s=0, margin=4, cache_dir=None)
    served = torch.from_numpy(client.hidden(ids)).double()  # [T, d]
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    live = out.hidden_states[-1][0].double()
    assert served.shape == live.shape
    rel = float((served - live).norm() / live.norm())
    assert rel < 0.1, rel  # measured 0.04 (Q4_1 weights, 8-bit activations)
    head = model.get_output_embeddings().weight.detach().double()
    p_live, p_served = torch.log_softmax(out.logits[0].double(), -1), torch.log_softmax(served @ head.T, -1)
    kl = (p_live.exp() * (p_live - p_served)).sum(-1)  # [T]
    assert float(kl.mean()) < 0.05, kl  # one position off would be nats


def _run(out: Path, data: Path, tokenizer: Path, teacher: dict[str, Any], objective: dict[str, Any]) -> dict:
    cfg = tiny_run(out, data, tokenizer, objective=objective)
    cfg["data"] = {**cfg["data"], "max_length": 64, "max_prompt_length": 48}
    cfg["optimization"] = {**cfg["optimization"], "micro_batch_size": 2, "max_steps": 2}
    return {**cfg, "teacher": teacher}


OBJECTIVES = {"kd-fused": {"name": "kd", "fused": "on", "kd_rate": 0.5}, "kd-topk": {"name": "kd", "top_k": 8},
              "dskd": {"name": "dskd"}, "dskdv2": {"name": "dskdv2"}, "gold": {"name": "gold"}}
ACROSS = {"dskdv2-eta": {"name": "dskdv2", "alignment": "eta"}, "uld": {"name": "uld"}, "mined": {"name": "mined"},
          "xtoken": {"name": "xtoken"}}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_hidden_state_objective_trains_against_the_server(name: str, tmp_path: Path, server: LocalServer,
                                                                data: Path, smollm2: Path) -> None:
    teacher = {"kind": "hidden_server", "path": str(smollm2), "server": {"url": server.url}}
    run = train(validate_config(_run(tmp_path / "run", data, smollm2, teacher, OBJECTIVES[name])))
    rows = read_metrics(run)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert any((run / "teacher-server-cache").rglob("*.npz"))


@pytest.mark.parametrize("name", list(ACROSS))
def test_across_tokenizers_objectives_train_against_the_server(name: str, tmp_path: Path, server: LocalServer,
                                                               data: Path, smollm2: Path) -> None:
    gpt2 = needs_real_models() / "tokenizers" / "gpt2"  # a GPT-2 student of a SmolLM2 teacher
    teacher = {"kind": "hidden_server", "path": str(smollm2), "server": {"url": server.url}}
    run = train(validate_config(_run(tmp_path / "run", data, gpt2, teacher, ACROSS[name])))
    assert len(read_metrics(run)) == 2


def test_a_head_that_is_not_the_served_models_is_refused(tmp_path: Path, server: LocalServer, data: Path,
                                                         smollm2: Path) -> None:
    # the same architecture with other (random) weights: the probe's log-probabilities disagree by nats
    teacher = {"kind": "hidden_server", "path": str(smollm2), "init": "random", "server": {"url": server.url}}
    with pytest.raises(DualKDError, match=r"disagree with the server's own log-probabilities by \d+\.\d+ nats"):
        train(validate_config(_run(tmp_path / "run", data, smollm2, teacher, {"name": "dskd"})))
    # another model: Gemma-3's head has 640 features, the server's hidden states 576
    teacher = {"kind": "hidden_server", "path": str(needs_real_models() / "gemma-3-270m"), "tokenizer": str(smollm2),
               "server": {"url": server.url}}
    with pytest.raises(DualKDError, match="hidden states have 576 features but the LM head"):
        train(validate_config(_run(tmp_path / "run2", data, smollm2, teacher, {"name": "dskd"})))
