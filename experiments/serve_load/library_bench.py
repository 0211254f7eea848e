"""Which server library: gptlab-serve (FastAPI + uvicorn, its own continuous batching) vs LitServe
(its own request batching: ``max_batch_size`` + ``batch_timeout``, then one ``predict`` per batch).

    pip install litserve        # only for this comparison; gptlab does not depend on it
    python experiments/serve_load/library_bench.py

Both serve the same random-weight model from the same file, each in its own process, on loopback:

* **overhead**: gpt2-tiny shape, ``max_tokens=1``: what the library itself costs per request
  (requests/s and latency at 16 clients);
* **batching**: gpt2-small shape, 16 clients, ``max_tokens`` 16-48 mixed (the workload of run.py):
  LitServe batches whole requests, so a batch decodes until its longest request is done
  (``predict`` = one left-padded ``generate()``, litserve_api.py); gptlab-serve releases each row when
  it is done and lets new requests join between steps.

Rounds alternate the order (A/B, B/A); tokens/s min / median / max over rounds, latency p50/p95 over
all requests.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from run import ServerProcess, pct, wait_ready, workload  # noqa: E402

from gptlab.model.config import GPTConfig  # noqa: E402
from gptlab.model.gpt import GPT  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, path: str, body: dict) -> tuple[float, int]:
    t0 = time.perf_counter()
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        answer = json.loads(r.read())
    tokens = answer["usage"]["completion_tokens"] if "usage" in answer else len(answer["tokens"])
    return time.perf_counter() - t0, tokens


def measure(url: str, path: str, requests: list[dict], clients: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda b: post(url, path, b), requests))
    wall = time.perf_counter() - t0
    return {"wall": wall, "n": len(results), "tokens": sum(n for _, n in results), "lat": [x for x, _ in results]}


def compare(title: str, model: str, requests_of, rounds: int, batch: int, unit: str, threads: int) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / f"{model}.pt"
        torch.save(GPT(GPTConfig.from_name(model)).state_dict(), weights)
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        lit = subprocess.Popen([sys.executable, str(HERE / "litserve_api.py"), str(weights), str(port), str(batch)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE.parents[1], env=env)
        ours = ServerProcess(weights, batch, "cpu", threads)
        servers = {"gptlab-serve (FastAPI + uvicorn)": (ours.url, "/v1/completions"),
                   "LitServe": (f"http://127.0.0.1:{port}", "/predict")}
        try:
            for url, path in servers.values():
                wait_ready(url)
                measure(url, path, requests_of(99)[:2], 2)  # warm-up
            cells: dict[str, list[dict]] = {}
            for r in range(rounds):
                for name in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                    url, path = servers[name]
                    cells.setdefault(name, []).append(measure(url, path, requests_of(r), 16))
                    print(f"[library_bench] {title} round {r + 1} {name}: {cells[name][-1]['wall']:.1f} s",
                          file=sys.stderr, flush=True)
        finally:
            ours.close()
            lit.terminate()
            lit.wait(timeout=60)
    print(f"\n**{title}** ({model} shape, random weights, 16 clients, {len(requests_of(0))} requests per round, "
          f"{rounds} rounds, max_batch_size={batch} for both)\n")
    print(f"| server | {unit} min / median / max | latency p50 (s) | latency p95 (s) |")
    print("|---|---|---:|---:|")
    for name, runs in cells.items():
        rates = sorted((x["tokens"] if unit == "tokens/s" else x["n"]) / x["wall"] for x in runs)
        lat = [v for x in runs for v in x["lat"]]
        print(f"| {name} | {rates[0]:.1f} / {statistics.median(rates):.1f} / {rates[-1]:.1f} | "
              f"{pct(lat, 0.5):.2f} | {pct(lat, 0.95):.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server's model process")
    args = ap.parse_args()
    load = os.getloadavg()
    print("`python experiments/serve_load/library_bench.py`\n")
    print(f"- load average at start (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; "
          f"torch {torch.__version__}, {os.cpu_count()} CPU cores, {args.threads} torch thread(s) per model process")

    def tiny_requests(seed: int) -> list[dict]:
        return [{**r, "max_tokens": 1} for r in workload(64, seed, (1, 1))]

    compare("overhead", "gpt2-tiny", tiny_requests, args.rounds, 16, "requests/s", args.threads)
    compare("batching", "gpt2-small", lambda seed: workload(16, 1000 + seed, (16, 48)), args.rounds, 16, "tokens/s",
            args.threads)
    load = os.getloadavg()
    print(f"\n- load average at the end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
