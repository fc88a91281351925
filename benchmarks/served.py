"""Scoring throughput of a served teacher: top-k log-probabilities vs hidden states (+ the LM head here).

    python benchmarks/served.py                       # SmolLM2-135M-Instruct GGUF, 4 Dolly examples, 3 reps
    python benchmarks/served.py --examples 8 --reps 5 --out benchmarks/results/served-DATE.txt

One server, `dualkd serve-teacher` (llama.cpp's Python server plus the hidden-state route: both paths on the
same process, model and threads), started here on 127.0.0.1 with --threads 2. The same response sequences
(the library's tokenization of Dolly prompt + response, as training reads them) are scored by:

- `topk`: `ServerClient.score(ids, 64)`, what `kind: server` asks (/v1/completions with echo and logprobs:
  the server ranks the whole vocabulary per position in Python, then the client places the strings);
- `hidden`: `ServerClient.hidden(ids)`, what `kind: hidden_server` asks, then the top-64 of h W^T from the
  local head (`topk_rows`), so both variants end with the same top-64 targets (the hidden path also has the
  full distribution at hand).

Requests go one at a time, without the disk cache. Reported: response-sequence tokens per second per variant
(min / median / max of the interleaved reps, benchmarks/harness.py), the ratio hidden ÷ topk of the times, the
bytes per token on the wire, and how far the two paths' top-64 log-probabilities lie apart.
Needs the real models (`$DUALKD_REAL_MODELS`) and Dolly (`$DUALKD_DATA`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.harness

from benchmarks.harness import interleaved, may_write, spread, start_load  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("DUALKD_REAL_MODELS", Path.home() / ".cache" / "dualkd-real"))
DATA = Path(os.environ.get("DUALKD_DATA", REPO.parent / "shared" / "data")) / "dolly" / "train.jsonl"
K = 64


def _serve(gguf: Path, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-m", "dualkd.cli", "serve-teacher", str(gguf), "--port",
                                str(port), "--n-ctx", "1024", "--threads", "2"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
            return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not start within 120 s")


def _post_size(url: str, body: dict) -> int:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return len(urllib.request.urlopen(request, timeout=600).read())


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dualkd.losses.sparse import topk_rows
    from dualkd.teachers.server_client import ServerClient
    from tests.helpers import free_port, smollm2_gguf

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128, help="each sequence cut to this many tokens")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    parser.add_argument("--shared-ok", action="store_true", help="write the report on a shared machine too")
    args = parser.parse_args()
    start_load()
    torch.set_num_threads(1)

    folder = MODELS / "smollm2-135m-instruct"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    records = [json.loads(line) for line in DATA.read_text().splitlines()[: args.examples]]
    sequences = []
    for r in records:
        prompt = r.get("prompt") or r.get("instruction", "")
        output = r.get("output") or r.get("response", "")
        ids = tokenizer(f"{prompt}\n{output}", add_special_tokens=False)["input_ids"][: args.max_tokens]
        sequences.append(ids)
    tokens = sum(len(s) for s in sequences)
    head = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).get_output_embeddings().weight.detach()

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = _serve(smollm2_gguf(MODELS, Path(tmp)), port)
        try:
            url = f"http://127.0.0.1:{port}"
            client = ServerClient(url, tokenizer, timeout_s=600, retries=0, backoff_s=0, margin=16, cache_dir=None)

            def topk() -> list:
                return [client.score(ids, K) for ids in sequences]

            def hidden() -> list:
                return [topk_rows(torch.from_numpy(client.hidden(ids)), head, None, K) for ids in sequences]

            timing = interleaved({"topk": topk, "hidden": hidden}, reps=args.reps, threads=2)
            wire_topk = sum(_post_size(f"{url}/v1/completions", {
                "prompt": tokenizer.decode(ids), "echo": True, "logprobs": K + 16, "max_tokens": 1,
                "temperature": 0.0}) for ids in sequences)
            wire_hidden = sum(_post_size(f"{url}/dualkd/hidden", {"tokens": ids}) for ids in sequences)
            hidden_states = {tuple(ids): client.hidden(ids) for ids in sequences}
        finally:
            server.kill()

    # the same positions' top-64: the server's own log-probabilities vs those of h W^T with the float32 head
    gaps, same = [], []
    for ids, scored, local in zip(sequences, timing.last["topk"], timing.last["hidden"]):
        v = torch.from_numpy(scored.valid)
        served_ids = torch.from_numpy(scored.ids)[v]
        same.append((served_ids[:, :, None] == local.ids[v][:, None, :]).any(-1).float().mean())
        ours = torch.log_softmax(torch.from_numpy(hidden_states[tuple(ids)]) @ head.T, -1)[v]  # [T', V]
        gaps.append((torch.from_numpy(scored.logprobs)[v] - ours.gather(1, served_ids)).abs().mean())
    rates = {name: [tokens / s for s in timing.seconds[name]] for name in timing.seconds}
    lines = [
        f"served scoring, SmolLM2-135M-Instruct Q4_1 GGUF, {len(sequences)} Dolly sequences, {tokens} tokens "
        f"(each ≤ {args.max_tokens}), top-{K}, one request at a time, server --threads 2, client 1 thread",
        timing.table(baseline="topk", unit="s", scale=1.0),
        f"tokens/s (min / median / max): topk {spread(rates['topk'], '{:.1f}')}; "
        f"hidden {spread(rates['hidden'], '{:.1f}')}",
        f"speed-up hidden over topk (per rep, topk ÷ hidden): "
        f"{spread([1 / r for r in timing.ratios('hidden', 'topk')], '{:.1f}')}×",
        f"bytes per token on the wire: topk {wire_topk / tokens:.0f}, hidden {wire_hidden / tokens:.0f} "
        f"(full-vocabulary float32 logits would be {len(tokenizer) * 4})",
        f"top-{K} id overlap topk vs hidden: {float(torch.stack(same).mean()):.3f}; mean |Δ log p| on the "
        f"server's top-{K}: {float(torch.stack(gaps).mean()):.3f} nats (the server's head and activations are "
        "quantized, ours not)",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out is not None and may_write(timing, args.shared_ok):
        args.out.write_text(report + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
