"""Preference data (`dualkd preference build`), alignment evaluation (`dualkd align-eval`) and the LLM judge
(`dualkd judge`, against a small HTTP server started on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dualkd.data.formats import parse_record
from dualkd.errors import DataError
from tests.helpers import write_jsonl


def test_preference_records() -> None:
    ex = parse_record({"prompt": "Q?", "chosen": "yes", "rejected": "no"}, "f:1")
    assert (ex.prompt, ex.response, ex.rejected) == ("Q?", "yes", "no")
    assert ex.rejected_example.response == "no" and ex.rejected_example.prompt == "Q?"
    user = {"role": "user", "content": "Q?"}
    full = parse_record({"prompt": "Q?", "chosen": [user, {"role": "assistant", "content": "yes"}],
                         "rejected": [user, {"role": "assistant", "content": "no"}]}, "f:2")
    short = parse_record({"prompt": "Q?", "chosen": [{"role": "assistant", "content": "yes"}],
                          "rejected": [{"role": "assistant", "content": "no"}]}, "f:3")
    assert full.messages == short.messages and full.rejected == short.rejected == "no"
    bad = [({"prompt": "Q?", "chosen": "yes"}, "field 'rejected' is missing"),
           ({"prompt": "Q?", "chosen": "yes", "rejected": " "}, "field 'rejected': empty response"),
           ({"chosen": "yes", "rejected": "no"}, "field 'prompt' is missing"),
           ({"prompt": "Q?", "chosen": "yes", "rejected": ["no"]}, "two strings or two message lists"),
           ({"chosen": [user, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
            "differ before the last turn"),
           ({"prompt": "Q?", "chosen": [user, {"role": "user", "content": "x"}],
             "rejected": [user, {"role": "assistant", "content": "b"}]}, r"field 'chosen\[1\]'")]
    for record, message in bad:
        with pytest.raises(DataError, match=message) as e:
            parse_record(record, "prefs.jsonl:7")
        assert str(e.value).startswith("prefs.jsonl:7")

def test_preference_build_and_align_eval(tmp_path: Path, train_file: Path, teacher_dir: Path,
                                         reverse_model: Path) -> None:
    from dualkd.cli import main
    from dualkd.config import GenerationConfig
    from dualkd.eval.alignment import evaluate_alignment

    out = tmp_path / "prefs.jsonl"
    assert main(["preference", "build", str(teacher_dir), "--data", str(train_file), "--out", str(out),
                 "--max-examples", "12", "--max-new-tokens", "8", "--no-repeat-ngram-size", "0"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    originals = [json.loads(line) for line in train_file.read_text().splitlines()][:12]
    assert rows and all(r["chosen"] == next(o["output"] for o in originals if o["prompt"] == r["prompt"])
                        and r["rejected"] != r["chosen"] for r in rows)
    settings = GenerationConfig(max_new_tokens=8, max_length=96, max_prompt_length=80)
    same = evaluate_alignment(teacher_dir, out, teacher_dir, teacher_dir, beta=0.1, settings=settings)
    assert same["kl_to_dpo"] == pytest.approx(0.0, abs=1e-5)  # the model is its own DPO model
    other = evaluate_alignment(teacher_dir, out, reverse_model, teacher_dir, beta=0.1, settings=settings,
                               out=tmp_path / "ae")
    assert other["kl_to_dpo"] > 0 and 0 < other["response_length"] <= 8
    assert same["reward_accuracy"] == 0.0 and same["reward_margin"] == 0.0  # π = π_ref: every margin is 0
    assert (tmp_path / "ae" / "alignment.json").exists() and (tmp_path / "ae" / "samples.jsonl").exists()

class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-style endpoint whose judge prefers the longer response; the first request fails with 503."""

    calls = 0

    def do_POST(self) -> None:  # noqa: N802
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if type(self).calls == 1:
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"warming up")
            return
        text = body["messages"][-1]["content"]
        a = text.split("[Response A]\n", 1)[1].split("\n\n[Response B]", 1)[0]
        b = text.split("[Response B]\n", 1)[1].split("\n\nWhich response", 1)[0]
        verdict = "tie" if len(a) == len(b) else ("A" if len(a) > len(b) else "B")
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": f"{verdict}."}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass

def test_judge_against_a_local_server(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dualkd.cli import main

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1"
    prompts = [f"question {i}" for i in range(6)]
    cand = write_jsonl(tmp_path / "cand.jsonl", [{"prompt": p, "generation": "long answer " * (i % 3)}
                                                 for i, p in enumerate(prompts)])
    base = write_jsonl(tmp_path / "base.jsonl", [{"prompt": p, "output": "long answer "} for p in reversed(prompts)])
    cache = tmp_path / "cache.jsonl"
    try:
        args = ["judge", str(cand), str(base), "--endpoint", endpoint, "--model", "judge", "--cache", str(cache),
                "--out", str(tmp_path / "judge.json")]
        assert main([*args, "--max-requests", "5"]) == 0  # the budget stops it part-way
        partial = json.loads((tmp_path / "judge.json").read_text())
        assert partial["stopped"] and partial["judged"] < 6 and partial["requests_sent"] == 5
        assert main(args) == 0
        result = json.loads((tmp_path / "judge.json").read_text())
        # candidate lengths: 0, 1, 2 repeats vs 1 repeat -> loss, tie, win, twice over
        assert (result["wins"], result["ties"], result["losses"]) == (2, 2, 2)
        assert result["win_rate"] == pytest.approx(50.0) and result["cache_hits"] >= 4
        assert main(args) == 0  # all cached now: no request goes out
        again = json.loads((tmp_path / "judge.json").read_text())
        assert again["requests_sent"] == 0 and again["cache_hits"] == 12
    finally:
        server.shutdown()
