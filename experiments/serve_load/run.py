"""Load test of ``gptlab-serve``: concurrent clients on loopback, batched vs one request at a time.

    python experiments/serve_load/run.py                         # CPU: gpt2-small shape, 1/4/16 clients, 3 rounds
    python experiments/serve_load/run.py --device cuda --clients 1,16,64 --rounds 2
    python experiments/serve_load/run.py --smoke                 # tiny shapes, servers in this process: checks the code

Two servers run side by side over the same random-weight model (the speed of a shape does not depend on
its weights): ``max_batch_size=16`` (continuous batching) and ``max_batch_size=1`` (one request at a time,
the others queue). Each round measures every client count on both servers, interleaved (A/B, B/A), so
load from other jobs hits both alike; the ratio batched / one-at-a-time is taken within each round.

Clients are threads here sending non-streaming ``POST /v1/completions`` (greedy, so both servers do exactly
the same work); a fixed, bounded list of requests per client count, prompts of 8-40 tokens and
``max_tokens`` 16-48 mixed, drawn with a fixed seed. Tokens/s = completion tokens of the round / its wall
time; latency = each request's time from send to answer (p50/p95 over all rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gptlab.model.config import GPTConfig  # noqa: E402
from gptlab.model.gpt import GPT  # noqa: E402
from gptlab.tokenizer import ASSETS, get_tokenizer  # noqa: E402


def workload(n: int, seed: int, max_tokens: tuple[int, int]) -> list[dict]:
    """``n`` completion requests: slices of the-verdict.txt of 8-40 tokens, mixed lengths to generate."""
    rng = random.Random(seed)
    ids = get_tokenizer().encode((ASSETS / "the-verdict.txt").read_text(encoding="utf-8"))
    out = []
    for _ in range(n):
        length = rng.randint(8, 40)
        start = rng.randrange(0, len(ids) - length)
        out.append({"model": "bench", "prompt": ids[start:start + length], "temperature": 0,
                    "max_tokens": rng.randint(*max_tokens)})
    return out


def post(url: str, body: dict) -> tuple[float, int]:
    """Send one request; (latency in s, completion tokens)."""
    t0 = time.perf_counter()
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        answer = json.loads(r.read())
    return time.perf_counter() - t0, answer["usage"]["completion_tokens"]


def measure(url: str, requests: list[dict], clients: int) -> dict:
    """``clients`` threads work through ``requests``; wall time, tokens, per-request latencies."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda body: post(url, body), requests))
    wall = time.perf_counter() - t0
    tokens = sum(n for _, n in results)
    return {"wall": wall, "tokens": tokens, "tok_s": tokens / wall, "latencies": [lat for lat, _ in results]}


class ServerProcess:
    """``gptlab-serve`` in a subprocess (its own interpreter: the clients here never hold its GIL)."""

    def __init__(self, weights: Path, max_batch_size: int, device: str, threads: int | None = None):
        cmd = [sys.executable, "-m", "gptlab.cli.serve", f"init_from={weights}", "port=0", "model_name=bench",
               f"max_batch_size={max_batch_size}", "max_queue=256", f"device={device}", "precision=auto"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the server
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        self.url = None
        lines = []
        for line in self.proc.stderr:
            lines.append(line)
            if m := re.search(r"listening on (http://\S+) ", line):
                self.url = m.group(1)
                break
        if self.url is None:
            raise SystemExit("gptlab-serve did not start:\n" + "".join(lines[-20:]))
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


class ServerThread:
    """The same server on a thread of this process (``--smoke``: no interpreter start-up per server)."""

    def __init__(self, weights: Path, max_batch_size: int, device: str, threads: int | None = None):
        from gptlab.inference import load_model
        from gptlab.serving.app import build_server

        self.server = build_server(load_model(init_from=weights, device=device), "bench", port=0,
                                   max_batch_size=max_batch_size, max_queue=256)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = self.server.url

    def close(self) -> None:
        self.server.stop()
        self.thread.join(120)


def wait_ready(url: str) -> None:
    for _ in range(3000):
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} never answered /health")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-small", help="a GPTConfig preset (random weights)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--requests", default="4,8,16", help="requests per client count (same order)")
    ap.add_argument("--max-tokens", default="16,48", help="min,max of max_tokens per request")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="max_batch_size of the batched server")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per server process (OMP_NUM_THREADS); default: torch's own choice")
    ap.add_argument("--in-process", action="store_true", help="servers on threads here (faster start, GIL shared)")
    ap.add_argument("--smoke", action="store_true", help="gpt2-tiny, 1 round, few tokens, in process: checks the code")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.clients, args.requests, args.max_tokens, args.rounds, args.in_process = \
            "gpt2-tiny", "1,4", "2,4", "4,8", 1, True
    clients = [int(c) for c in args.clients.split(",")]
    counts = [int(c) for c in args.requests.split(",")]
    lo, hi = (int(x) for x in args.max_tokens.split(","))
    if len(counts) != len(clients):
        ap.error("--requests needs one count per --clients entry")

    torch.manual_seed(0)
    config = GPTConfig.from_name(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / f"{args.model}-random.pt"
        torch.save(GPT(config).state_dict(), weights)
        server_cls = ServerThread if args.in_process else ServerProcess
        load_before = os.getloadavg()
        t_start = time.perf_counter()
        servers = {"batched": server_cls(weights, args.batch, args.device, args.threads),
                   "one-at-a-time": server_cls(weights, 1, args.device, args.threads)}
        try:
            for s in servers.values():
                wait_ready(s.url)
                measure(s.url, workload(2, 99, (4, 4)), 2)  # warm-up: first-call costs are not measured
            cells: dict[tuple[str, int], list[dict]] = {}
            for r in range(args.rounds):
                for c, n in zip(clients, counts):
                    order = list(servers) if r % 2 == 0 else list(servers)[::-1]  # A/B, then B/A
                    for name in order:
                        res = measure(servers[name].url, workload(n, 1000 * r + c, (lo, hi)), c)
                        cells.setdefault((name, c), []).append(res)
                        print(f"[serve_load] round {r + 1} {name:13s} {c:3d} clients: {res['tok_s']:7.1f} tok/s, "
                              f"{res['tokens']} tokens in {res['wall']:.1f} s", file=sys.stderr, flush=True)
        finally:
            for s in servers.values():
                s.close()
        load_after = os.getloadavg()
        elapsed = time.perf_counter() - t_start

    print(f"`python experiments/serve_load/run.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace("  ", " "))
    print()
    print(f"- model: {args.model} shape, random weights ({GPT(config).num_params() / 1e6:.0f}M parameters), "
          f"device {args.device}, torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"server threads {args.threads or 'default'}; {args.rounds} rounds, "
          f"{elapsed:.0f} s in all")
    print(f"- load average (1/5/15 min) before: {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f}, "
          f"after: {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f}")
    print(f"- requests per round: {dict(zip(clients, counts))} (clients: requests), max_tokens {lo}-{hi}, greedy")
    print()
    print("| clients | server | tokens/s min / median / max | latency p50 (s) | latency p95 (s) |")
    print("|---:|---|---|---:|---:|")
    for c in clients:
        for name in servers:
            runs = cells[(name, c)]
            tps = sorted(x["tok_s"] for x in runs)
            lats = [lat for x in runs for lat in x["latencies"]]
            print(f"| {c} | {name} (max_batch_size={args.batch if name == 'batched' else 1}) | "
                  f"{tps[0]:.1f} / {statistics.median(tps):.1f} / {tps[-1]:.1f} | {pct(lats, 0.5):.2f} | {pct(lats, 0.95):.2f} |")
    print()
    print("| clients | batched / one-at-a-time throughput, per round: min / median / max |")
    print("|---:|---|")
    for c in clients:
        ratios = sorted(b["tok_s"] / s["tok_s"] for b, s in zip(cells[("batched", c)], cells[("one-at-a-time", c)]))
        print(f"| {c} | {ratios[0]:.2f}x / {statistics.median(ratios):.2f}x / {ratios[-1]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
