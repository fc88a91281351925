"""A teacher behind a real inference server: llama.cpp's Python server (llama-cpp-python[server]) serving the
SmolLM2-135M-Instruct GGUF that ../shared/tools/real-models downloads, started by the test on 127.0.0.1.

The live twin is the same GGUF dequantized to float32 (the HF folder real-models writes), so the two differ by
the server's arithmetic only: llama.cpp multiplies the Q4_1 weights with 8-bit-quantized activations.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dualkd.config import RunConfig
from dualkd.teachers.server_client import ServerClient, ServerMismatch, ServerUnavailable
from dualkd.train.loop import train
from tests.helpers import LocalServer, free_port, needs_real_models, read_metrics, synthetic_records, tiny_run

pytestmark = pytest.mark.slow

K = 8


def llama_cpp_server(gguf: Path, port: int | None = None) -> LocalServer:
    """`python -m llama_cpp.server` serving `gguf` (not started)."""
    return LocalServer(lambda p: [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host",
                                  "127.0.0.1", "--port", str(p), "--n_ctx", "1024", "--n_threads", "2",
                                  "--verbose", "false"], port)


@pytest.fixture(scope="module")
def server(gguf: Path) -> Iterator[LocalServer]:
    running = llama_cpp_server(gguf).start()
    yield running
    running.kill()


def _tokenizer(path: Path):  # noqa: ANN202
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _client(url: str, tokenizer, **kw) -> ServerClient:  # noqa: ANN001
    settings = {"timeout_s": 60.0, "retries": 1, "backoff_s": 0.1, "margin": 4, "cache_dir": None, **kw}
    return ServerClient(url, tokenizer, **settings)


def test_the_server_scores_as_the_live_model(server: LocalServer, smollm2: Path) -> None:
    """Top-k of every position of a sequence: the server vs the dequantized model in float32."""
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer(smollm2)
    text = synthetic_records(1, seed=3)[0]
    ids = tokenizer(text["prompt"] + text["output"])["input_ids"]
    scored = _client(server.url, tokenizer).score(ids, K)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)  # [T, V]
    live_ids = logp.topk(K, dim=-1).indices
    valid = torch.from_numpy(scored.valid)
    assert valid[1:-1].all() and not valid[0]
    served_ids, served_lp = torch.from_numpy(scored.ids), torch.from_numpy(scored.logprobs).double()
    # every entry the client placed is the token the live model gives that log-probability, within the
    # server's quantized arithmetic (measured on Dolly: mean |Δ| 0.07-0.09, max 0.35-0.9 nats)
    err = (torch.gather(logp, 1, served_ids) - served_lp).abs()[valid]
    assert float(err.max()) < 1.5 and float(err.mean()) < 0.12, (float(err.max()), float(err.mean()))
    # where no entry was displaced, the same most likely token (a near tie may flip under quantization)
    whole = valid & ~torch.from_numpy(scored.displaced)
    assert whole.sum() >= 3  # " " is often in the top k: 13-32% of Dolly positions are displaced
    assert (served_ids[whole, 0] == live_ids[whole, 0]).float().mean() >= 0.9


def test_a_server_of_another_tokenizer_is_refused(server: LocalServer) -> None:
    gpt2 = _tokenizer(needs_real_models() / "tokenizers" / "gpt2")
    with pytest.raises(ServerMismatch, match="tokenizes the sequence differently"):
        _client(server.url, gpt2).check_tokenizer()


def test_a_dead_server_is_reported_after_the_retries(smollm2: Path) -> None:
    client = _client(f"http://127.0.0.1:{free_port()}", _tokenizer(smollm2), retries=2, backoff_s=0.05)
    started = time.time()
    with pytest.raises(ServerUnavailable, match="after 3 tries"):
        client.check_tokenizer()
    assert time.time() - started < 10


def _kd_run(out: Path, data: Path, smollm2: Path, teacher: dict, steps: int = 3, **sections) -> dict:  # noqa: ANN003
    cfg = tiny_run(out, data, smollm2, teacher=smollm2, **sections)
    cfg["data"] = {**cfg["data"], "max_length": 64, "max_prompt_length": 48}
    cfg["optimization"] = {**cfg["optimization"], "micro_batch_size": 2, "max_steps": steps}
    cfg["objective"] = {"name": "kd", "top_k": K, "kd_rate": 0.5}
    cfg["teacher"] = teacher
    return cfg


def test_kd_from_the_served_teacher_equals_kd_from_the_live_teacher(tmp_path: Path, server: LocalServer, data: Path,
                                                                   smollm2: Path) -> None:
    """The sparse KD loss of one batch from the server's targets and from the live model's, the live top-k put
    through what the protocol can express (entries named by a shared string leave the top k: their mass goes
    to the tail); then both teachers train three steps."""
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM

    from dualkd.lm import head_of, lm_forward
    from dualkd.losses.sparse import TopKTargets, log_tail_mass, sparse_kl
    from dualkd.teachers import LiveTeacher
    from dualkd.teachers.server_client import StringIds, server_strings
    from dualkd.train.build import build_parts
    from dualkd.train.engine import LocalEngine

    served_cfg = _kd_run(tmp_path / "served", data, smollm2,
                         {"path": str(smollm2), "server": {"url": server.url, "top_k": K}})
    parts = build_parts(RunConfig.model_validate(served_cfg), tmp_path / "served", LocalEngine())
    batch = parts.train_set.collate([0, 1, 2, 3])
    tokenizer = _tokenizer(smollm2)
    vocab = len(tokenizer)
    served = parts.teacher.topk(batch.student, batch.indices, K, vocab)
    live = LiveTeacher(AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval(), tokenizer)
    live.attach(torch.device("cpu"), lambda m, placement: m, nullcontext)
    wide = live.topk(batch.student, batch.indices, 64, vocab)
    names = StringIds(tokenizer)
    printed = [text for text, _ in server_strings(tokenizer)]
    placeable = torch.tensor([names.get(text) is not None for text in printed])
    keep = placeable[wide.ids]  # [N, 64]
    order = torch.argsort((~keep).int(), dim=1, stable=True)[:, :K]  # the first K placeable, in rank order
    ids, lp = wide.ids.gather(1, order), wide.logprobs.gather(1, order)
    twin = TopKTargets(ids=ids, logprobs=lp, tail=log_tail_mass(lp))
    same = (served.ids[:, :, None] == twin.ids[:, None, :]).any(-1).float().mean()
    assert same > 0.85, same  # the same tokens, up to near ties at the k-th rank flipped by quantization

    student = parts.student
    hidden = lm_forward(student, batch.student, hidden=True, logits=False).hidden[batch.student.loss_mask]
    head, _ = head_of(student)
    with torch.no_grad():
        from_server = sparse_kl(hidden, head[:vocab], served, temperature=1.0)
        from_live = sparse_kl(hidden, head[:vocab], twin, temperature=1.0)
    # within the server's arithmetic: its log-probabilities are off by 0.07-0.09 nats on average
    assert float(from_server) == pytest.approx(float(from_live), rel=2e-2)
    parts.teacher.close()

    live_cfg = _kd_run(tmp_path / "live", data, smollm2, {"path": str(smollm2)})
    train(RunConfig.model_validate(live_cfg))
    train(RunConfig.model_validate(served_cfg))
    a, b = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "served")
    assert len(a) == len(b) == 3
    assert a[0]["ce"] == pytest.approx(b[0]["ce"], rel=1e-6)  # the same student before the first update
    for x, y in zip(a, b):  # the full top-k vs what the server can name (half the positions here): close only;
        assert x["kd"] == pytest.approx(y["kd"], rel=0.25)  # a target one position off would be several nats
    assert any((tmp_path / "served" / "teacher-server-cache").rglob("*.npz"))


def test_a_killed_server_stops_the_run_with_a_checkpoint(tmp_path: Path, gguf: Path, data: Path,
                                                         smollm2: Path) -> None:
    server = llama_cpp_server(gguf).start()
    teacher = {"path": str(smollm2), "server": {"url": server.url, "top_k": K, "retries": 1, "backoff_s": 0.1,
                                                "timeout_s": 30, "concurrency": 1,
                                                "cache_dir": str(tmp_path / "cache")}}
    cfg = _kd_run(tmp_path / "run", data, smollm2, teacher, steps=8, checkpoint={"every_steps": 1})

    def kill_after_two_steps() -> None:
        metrics = tmp_path / "run" / "metrics.jsonl"
        while not (metrics.exists() and sum('"train"' in line for line in metrics.read_text().splitlines()) >= 2):
            time.sleep(0.05)
        server.kill()

    killer = threading.Thread(target=kill_after_two_steps, daemon=True)
    killer.start()
    started = time.time()
    try:
        with pytest.raises(ServerUnavailable, match="resume with checkpoint.resume=auto") as stopped:
            train(RunConfig.model_validate(cfg))
    finally:
        server.kill()
    assert time.time() - started < 120
    done = len(read_metrics(tmp_path / "run"))
    assert 2 <= done < 8 and f"checkpoint of step {done}" in str(stopped.value)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "teacher_unavailable" for e in events)

    again = llama_cpp_server(gguf, port=server.port).start()  # the same address: the run's config is unchanged
    try:
        train(RunConfig.model_validate({**cfg, "checkpoint": {"every_steps": 1, "resume": "auto"}}))
    finally:
        again.kill()
    assert [r["step"] for r in read_metrics(tmp_path / "run")][-1] == 8


def test_seqkd_from_the_served_teacher(tmp_path: Path, server: LocalServer, data: Path, smollm2: Path) -> None:
    cfg = tiny_run(tmp_path / "run", data, smollm2, teacher=smollm2)
    cfg["objective"] = {"name": "sft"}
    cfg["source"] = {"kind": "seqkd"}
    cfg["data"] = {**cfg["data"], "max_examples": 4}
    cfg["generation"] = {"max_new_tokens": 12, "no_repeat_ngram_size": 0}
    cfg["optimization"] = {**cfg["optimization"], "micro_batch_size": 2, "max_steps": 1}
    cfg["teacher"] = {"path": str(smollm2), "server": {"url": server.url}}
    train(RunConfig.model_validate(cfg))
    written = [json.loads(line) for line in (tmp_path / "run" / "seqkd-train.jsonl").read_text().splitlines()]
    assert len(written) == 4

    from dualkd.config import DataSource
    from dualkd.data.readers import load_examples
    from dualkd.generate import GenerationConfig, prompt_ids

    examples, _ = load_examples(DataSource(path=str(data)), "auto", "raise", 4)
    tokenizer = _tokenizer(smollm2)
    client = _client(server.url, tokenizer)
    prompts = prompt_ids(examples, tokenizer, GenerationConfig(max_new_tokens=12))
    for prompt, record in zip(prompts, written):
        text = client.complete(prompt, 12)
        assert text.strip() == record["output"]  # the file holds the server's greedy continuation
        # greedy means: every written token is the server's own most likely one (no repeat penalty, min-p or
        # top-k of the server's defaults), checked against its scoring of the written sequence
        full = prompt + tokenizer(text, add_special_tokens=False)["input_ids"]
        scored = client.score(full, 4)
        checked = 0
        for t in range(len(prompt) - 1, len(full) - 1):
            if scored.valid[t] and not scored.displaced[t]:
                assert scored.ids[t, 0] == full[t + 1], (t, tokenizer.decode(full[len(prompt):t + 2]))
                checked += 1
        assert checked >= 4


def test_on_policy_kd_from_the_served_teacher(tmp_path: Path, server: LocalServer, data: Path, smollm2: Path) -> None:
    """The server scores the student's own samples (a pretrained student: its samples are tokenized as its
    tokenizer would tokenize their text, which the server's text prompt needs)."""
    cfg = _kd_run(tmp_path / "run", data, smollm2, {"path": str(smollm2), "server": {"url": server.url, "top_k": K}},
                  steps=2, source={"kind": "on_policy", "student_gen_ratio": 1.0, "max_new_tokens": 12})
    cfg["student"] = {"path": str(smollm2)}
    records = read_metrics(train(RunConfig.model_validate(cfg)))
    assert [r["sampled"] for r in records] == [1.0, 1.0]
    assert all(r["sampled_tokens"] > 0 and 0 < r["kd"] < 20 for r in records)
