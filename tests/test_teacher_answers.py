"""A teacher's answers are checked where they enter: every broken top-k (NaN, +inf, log-probabilities above 0,
mass above 1, ids outside the vocabulary, wrong shapes) stops with a message naming the source; a served
teacher is bounded (deadline, size, no redirects) and its malformed answers become messages.

The server here is a fake one on 127.0.0.1 that speaks llama.cpp's protocol (teachers/server_client.py) with
a tokenizer trained in the test, and answers as each case says."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer

from dualkd.errors import ConfigError, DualKDError
from dualkd.teachers.checks import TeacherOutputError, check_topk
from dualkd.teachers.server_client import (
    ServerClient,
    ServerInterrupted,
    ServerMismatch,
    ServerUnavailable,
    StringIds,
)

K, V = 4, 50
GOOD_IDS = np.tile(np.arange(K), (3, 1))
GOOD_LP = np.log(np.full((3, K), 0.2))


def _replace(a: np.ndarray, at: tuple[int, int], value: float) -> np.ndarray:
    a = a.astype(np.float64).copy()
    a[at] = value
    return a


BROKEN_TOPK = {
    "NaN log-probability": (GOOD_IDS, _replace(GOOD_LP, (1, 2), math.nan), None, "log-probability nan"),
    "+inf log-probability": (GOOD_IDS, _replace(GOOD_LP, (0, 0), math.inf), None, "log-probability inf"),
    "log-probability above 0": (GOOD_IDS, _replace(GOOD_LP, (2, 1), 0.5), None, "a number ≤ 0"),
    "mass above 1": (GOOD_IDS, np.log(np.full((3, K), 0.4)), None, "sum to 1.6000, above 1"),
    "id past the vocabulary": (_replace(GOOD_IDS, (1, 0), V).astype(np.int64), GOOD_LP, None, f"token id {V}"),
    "negative id": (_replace(GOOD_IDS, (1, 0), -1).astype(np.int64), GOOD_LP, None, "token id -1"),
    "float ids": (GOOD_IDS.astype(np.float32), GOOD_LP, None, "expected integers"),
    "k other than asked": (GOOD_IDS[:, :3], GOOD_LP[:, :3], None, r"expected \[N, 4\]"),
    "shapes disagree": (GOOD_IDS, GOOD_LP[:2], None, "shapes"),
    "NaN tail": (GOOD_IDS, GOOD_LP, np.array([math.log(0.2), math.nan, math.log(0.2)]), "tail log-mass nan"),
    "tail that breaks the sum": (GOOD_IDS, GOOD_LP, np.zeros(3), "sum to 1.8000, not 1"),
    "all -inf row with -inf tail": (GOOD_IDS, _replace(_replace(_replace(_replace(GOOD_LP, (1, 0), -math.inf),
                                    (1, 1), -math.inf), (1, 2), -math.inf), (1, 3), -math.inf),
                                    np.array([math.log(0.2), -math.inf, math.log(0.2)]), "sum to 0.0000, not 1"),
    "tail of the wrong length": (GOOD_IDS, GOOD_LP, np.zeros(2), "tail masses have shape"),
}


@pytest.mark.parametrize("case", list(BROKEN_TOPK))
def test_a_broken_topk_answer_is_refused_with_its_source(case: str) -> None:
    ids, lp, tail, message = BROKEN_TOPK[case]
    with pytest.raises(TeacherOutputError, match=message) as err:
        check_topk(ids, lp, tail, k=K, vocab_size=V, where="cache X, example 7")
    assert str(err.value).startswith("cache X, example 7: ")


def test_a_valid_topk_answer_passes() -> None:
    check_topk(GOOD_IDS, GOOD_LP, None, k=K, vocab_size=V, where="w")
    check_topk(GOOD_IDS, GOOD_LP.astype(np.float16), np.log(np.full(3, 0.2)), k=K, vocab_size=V, where="w")
    lp = _replace(GOOD_LP, (0, 3), -math.inf)  # a token of probability 0 is a valid entry
    check_topk(GOOD_IDS, lp, np.log(1 - np.exp(lp).sum(-1)), k=K, vocab_size=V, where="w")


# ------------------------------------------------------------------------------------------ a fake server


Answer = Callable[[str, dict[str, Any]], tuple[int, dict[str, str], bytes, float]]
"""(path, request body) -> (status, headers, body, seconds between bytes: > 0 trickles the body)."""


class FakeServer:
    """llama.cpp's Python server as dualkd sees it, answering through `answer` (a good one by default)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.strings = list(StringIds(tokenizer).ids)  # strings that name exactly one token
        self.answer: Answer = self.good
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                status, headers, data, pause = owner.answer(self.path, body)
                self.send_response(status)
                for k, v in {"Content-Length": str(len(data)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    if isinstance(pause, tuple):  # (at, seconds): one stall after `at` bytes of the body
                        at, seconds = pause
                        self.wfile.write(data[:at])
                        self.wfile.flush()
                        time.sleep(seconds)
                        self.wfile.write(data[at:])
                    elif pause > 0:
                        for i in range(len(data)):
                            self.wfile.write(data[i:i + 1])
                            self.wfile.flush()
                            time.sleep(pause)
                    else:
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def good(self, path: str, body: dict[str, Any], value: Callable[[int, int], Any] | None = None
             ) -> tuple[int, dict[str, str], bytes, float]:
        if path == "/v1/models":
            return _json({"data": [{"id": "fake.gguf"}]})
        if path == "/extras/tokenize":
            return _json({"tokens": self.tokenizer(body["input"], add_special_tokens=False)["input_ids"]})
        if path == "/v1/completions" and body.get("echo"):
            n = len(self.tokenizer(body["prompt"], add_special_tokens=False)["input_ids"])
            m = body["logprobs"]
            value = value or (lambda t, j: math.log(0.5 / (j + 1) / m))
            entries = [None] + [{self.strings[j]: value(t, j) for j in range(m)} for t in range(1, n)]
            return _json({"choices": [{"text": "", "logprobs": {"top_logprobs": entries}}]})
        if path == "/v1/completions":
            return _json({"choices": [{"text": " an answer"}]})
        return 404, {}, b"not found", 0.0

    def close(self) -> None:
        self.httpd.shutdown()


def _json(value: Any, status: int = 200) -> tuple[int, dict[str, str], bytes, float]:
    return status, {"Content-Type": "application/json"}, json.dumps(value).encode(), 0.0


@pytest.fixture(scope="module")
def tokenizer(byte_tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(byte_tokenizer_dir)


@pytest.fixture
def server(tokenizer: Any) -> Iterator[FakeServer]:
    fake = FakeServer(tokenizer)
    yield fake
    fake.close()


def _client(url: str, tokenizer: Any, tmp: Path | None = None, **kw: Any) -> ServerClient:
    settings = {"timeout_s": 2.0, "retries": 1, "backoff_s": 0.01, "margin": 2, "cache_dir": tmp,
                "max_answer_mib": 1.0, **kw}
    return ServerClient(url, tokenizer, **settings)


def _ids(tokenizer: Any) -> list[int]:
    return tokenizer("Name a color. Red, and then blue.", add_special_tokens=False)["input_ids"]


def test_a_good_fake_answer_scores(server: FakeServer, tokenizer: Any, tmp_path: Path) -> None:
    client = _client(server.url, tokenizer, tmp_path)
    scored = client.score(_ids(tokenizer), K)
    assert scored.valid.sum() >= len(scored.valid) - 2 and scored.ids.shape == (len(_ids(tokenizer)), K)
    assert client.score(_ids(tokenizer), K).logprobs.tolist() == scored.logprobs.tolist()  # from the disk cache


def _with(server: FakeServer, completions: Callable[[dict[str, Any]], Any]) -> Answer:
    def answer(path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes, float]:
        if path == "/v1/completions" and body.get("echo"):
            return completions(body)
        return server.good(path, body)
    return answer


# each case: how the completions answer is broken -> the error class and message it must end in
BROKEN_ANSWERS: dict[str, tuple[Callable[[FakeServer], Answer], type[Exception], str]] = {
    "NaN log-probabilities": (lambda s: lambda p, b: s.good(p, b, lambda t, j: math.nan), TeacherOutputError,
                              "NaN log-probability"),
    "+Infinity log-probabilities": (lambda s: lambda p, b: s.good(p, b, lambda t, j: math.inf),
                                    TeacherOutputError, "log-probability inf"),
    "log-probabilities above 0": (lambda s: lambda p, b: s.good(p, b, lambda t, j: 0.7), TeacherOutputError,
                                  "a number ≤ 0"),
    "mass above 1": (lambda s: lambda p, b: s.good(p, b, lambda t, j: math.log(0.9)), TeacherOutputError,
                     "above 1"),
    "not JSON": (lambda s: _with(s, lambda b: (200, {}, b"{not json", 0.0)), ServerMismatch,
                 "does not understand"),
    "an empty body": (lambda s: _with(s, lambda b: (200, {}, b"", 0.0)), ServerMismatch, "does not understand"),
    "no choices": (lambda s: _with(s, lambda b: _json({"choices": []})), ServerMismatch, "does not understand"),
    "logprobs of the wrong type": (lambda s: _with(s, lambda b: _json(
        {"choices": [{"logprobs": {"top_logprobs": [None, ["a", 1]]}}]})), ServerMismatch, "does not understand"),
    "a string as a log-probability": (lambda s: lambda p, b: s.good(p, b, lambda t, j: "high"), ServerMismatch,
                                      "does not understand"),
    "a redirect": (lambda s: _with(s, lambda b: (307, {"Location": "http://example.org/"}, b"", 0.0)),
                   ServerMismatch, "a redirect"),
    "a sequence past the context": (lambda s: _with(s, lambda b: (500, {}, b'{"error": "Requested tokens (900) '
                                                                  b'exceed context window of 512"}', 0.0)),
                                    ServerMismatch, "longer than the server's context"),
    "an answer larger than the bound": (lambda s: _with(s, lambda b: (200, {}, b" " * (2 << 20), 0.0)),
                                        ServerMismatch, "exceeds 1 MiB"),
    "a 500 each time": (lambda s: _with(s, lambda b: (500, {}, b"boom", 0.0)), ServerUnavailable, "after 2 tries"),
}


@pytest.mark.parametrize("case", list(BROKEN_ANSWERS))
def test_a_broken_server_answer_ends_in_a_message(case: str, server: FakeServer, tokenizer: Any) -> None:
    make, error, message = BROKEN_ANSWERS[case]
    server.answer = make(server)
    with pytest.raises(error, match=message):
        _client(server.url, tokenizer).score(_ids(tokenizer), K)


def test_a_trickling_answer_is_bounded_by_the_deadline(server: FakeServer, tokenizer: Any) -> None:
    server.answer = _with(server, lambda b: (200, {}, b'{"choices": []}' * 10, 0.2))  # 30 s at one byte / 0.2 s
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match="no complete answer within 1 s"):
        _client(server.url, tokenizer, timeout_s=1.0, retries=0).score(_ids(tokenizer), K)
    assert time.monotonic() - started < 5


def test_a_stop_ends_the_wait_at_once(server: FakeServer, tokenizer: Any) -> None:
    server.answer = _with(server, lambda b: (200, {}, b" " * 100, 0.5))  # 50 s of trickle
    client = _client(server.url, tokenizer, timeout_s=60.0, retries=0)
    threading.Timer(0.5, client.stop.set).start()
    started = time.monotonic()
    with pytest.raises(ServerInterrupted):
        client.score(_ids(tokenizer), K)
    assert time.monotonic() - started < 4


def test_the_request_cache_follows_the_model_content(server: FakeServer, tokenizer: Any, tmp_path: Path) -> None:
    """A GGUF replaced under the same id gives other answers: the cache must not hand out the old ones."""
    first = _client(server.url, tokenizer, tmp_path).score(_ids(tokenizer), K)
    server.answer = lambda p, b: server.good(p, b, lambda t, j: math.log(0.3 / (j + 2) / 6))
    second = _client(server.url, tokenizer, tmp_path).score(_ids(tokenizer), K)
    assert not np.allclose(first.logprobs[first.valid], second.logprobs[second.valid])


def test_a_missing_tokenize_endpoint_names_the_server_kind(server: FakeServer, tokenizer: Any) -> None:
    server.answer = lambda p, b: (404, {}, b'{"detail": "Not Found"}', 0.0) if p == "/extras/tokenize" \
        else server.good(p, b)
    with pytest.raises(ServerMismatch, match="llama.cpp's Python server"):
        _client(server.url, tokenizer).check_tokenizer()


@pytest.mark.parametrize("url, message", [
    ("127.0.0.1:8080", "not an http"),
    ("http://127.0.0.1:8080/v1", "ends in /v1"),
    ("http://127.0.0.1:8080/v1/", "ends in /v1"),
    ("http://127.0.0.1:99999", "(?i)port"),
    ("http://127.0.0.1:8080/?a=1", "query"),
])
def test_a_bad_server_url_is_refused_at_config_time(url: str, message: str, tmp_path: Path, train_file: Path,
                                                    byte_tokenizer_dir: Path, teacher_dir: Path) -> None:
    from dualkd.config import validate_config
    from tests.helpers import tiny_run

    cfg = tiny_run(tmp_path / "run", train_file, byte_tokenizer_dir, teacher=teacher_dir,
                   objective={"name": "kd", "top_k": 4})
    cfg["teacher"] = {"path": str(teacher_dir), "server": {"url": url, "top_k": 4}}
    with pytest.raises(DualKDError, match=message):
        validate_config(cfg)
    with pytest.raises(ConfigError, match=message):
        _client(url, None)


def test_moving_the_server_is_no_change_of_the_run(tmp_path: Path, train_file: Path, byte_tokenizer_dir: Path,
                                                   teacher_dir: Path) -> None:
    """Where the server is and how it is asked change how, not what: a resume accepts them."""
    from dualkd.config import validate_config
    from dualkd.train.resume import resume_key
    from tests.helpers import tiny_run

    def key(**server: Any) -> dict[str, Any]:
        cfg = tiny_run(tmp_path / "run", train_file, byte_tokenizer_dir, teacher=teacher_dir,
                       objective={"name": "kd", "top_k": 4})
        cfg["teacher"] = {"path": str(teacher_dir), "server": {"url": "http://127.0.0.1:8080", "top_k": 4, **server}}
        return resume_key(validate_config(cfg), 4)

    assert key() == key(url="http://10.0.0.2:9000", timeout_s=30, concurrency=8, retries=1,
                        cache_dir=str(tmp_path / "c"), max_answer_mib=8)
    assert key() != key(top_k=8)


def test_a_server_cache_dir_that_is_a_file_is_named(tmp_path: Path, tokenizer: Any) -> None:
    from types import SimpleNamespace

    from dualkd.teachers.served import server_client

    file = tmp_path / "cache"
    file.write_text("")
    server = SimpleNamespace(url="http://127.0.0.1:1", cache_dir=str(file), timeout_s=1.0, retries=0,
                             backoff_s=0.0, margin=2, max_answer_mib=1.0)
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        server_client(server, tokenizer, tmp_path)


def test_sigterm_while_the_server_stalls_stops_the_run_at_once(server: FakeServer, tmp_path: Path, train_file: Path,
                                                               byte_tokenizer_dir: Path) -> None:
    """The loop waits on a server that answers nothing (one byte a second); SIGTERM ends the wait, the run stops
    with 128 + 15, not after the request's deadline."""
    import os
    import signal
    import subprocess
    import sys

    import yaml

    from tests.helpers import REPO, tiny_run

    asked = threading.Event()

    def answer(path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes, float]:
        if path == "/v1/completions" and body.get("echo") and not body["prompt"].startswith("The teacher"):
            asked.set()  # a training sequence (the probe of the served model's identity is answered)
            return 200, {}, b" " * 600, 1.0
        return server.good(path, body)

    server.answer = answer
    cfg = tiny_run(tmp_path / "run", train_file, byte_tokenizer_dir, objective={"name": "kd", "top_k": 4})
    cfg["teacher"] = {"tokenizer": str(byte_tokenizer_dir),
                      "server": {"url": server.url, "top_k": 4, "timeout_s": 300, "retries": 0}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    process = subprocess.Popen([sys.executable, "-m", "dualkd.cli", "train", str(config)], cwd=tmp_path,
                               env={**os.environ, "PYTHONPATH": str(REPO / "src")}, stderr=subprocess.PIPE,
                               text=True)
    try:
        assert asked.wait(120), "the run never asked the server about a training sequence"
        time.sleep(1.0)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
        assert time.monotonic() - started < 15
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err


def test_an_answer_that_stalls_halfway_arrives(server: FakeServer, tokenizer: Any) -> None:
    """A pause of 2.5 s in the middle of the body is not a failure (it was, once: a socket read that timed out left
    Python's socket file refusing every further read, 'cannot read from timed out object')."""
    def answer(path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes, Any]:
        status, headers, data, _ = server.good(path, body)
        return status, headers, data, ((len(data) // 2, 2.5) if path == "/v1/completions" else 0.0)

    server.answer = answer
    scored = _client(server.url, tokenizer, timeout_s=10.0, retries=0).score(_ids(tokenizer), K)
    assert scored.valid.sum() >= len(scored.valid) - 2


def test_a_slow_but_honest_answer_arrives(server: FakeServer, tokenizer: Any) -> None:
    """A server that thinks for 2.5 s before its headers is not a failure."""
    def answer(path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes, float]:
        if path == "/v1/completions":
            time.sleep(2.5)
        return server.good(path, body)

    server.answer = answer
    scored = _client(server.url, tokenizer, timeout_s=10.0, retries=0).score(_ids(tokenizer), K)
    assert scored.valid.sum() >= len(scored.valid) - 2
