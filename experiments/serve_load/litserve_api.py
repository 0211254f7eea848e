"""The LitServe side of library_bench.py: a ``LitAPI`` over gptlab's batched ``generate()``.

    python experiments/serve_load/litserve_api.py <weights> <port> <max_batch_size>

POST /predict {"prompt": [token ids], "max_tokens": n} -> {"tokens": [...]}. LitServe gathers up to
``max_batch_size`` requests (waiting at most ``batch_timeout``) and calls ``predict`` once per batch:
one left-padded greedy ``generate()`` until the longest request is done. (A module of its own: LitServe
starts its workers with ``spawn``, which needs the class importable by name.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import litserve as ls
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gptlab.inference import load_model  # noqa: E402
from gptlab.model.generation import generate  # noqa: E402


class GenerateAPI(ls.LitAPI):
    def __init__(self, weights: str, **kwargs):
        super().__init__(**kwargs)
        self.weights = weights

    def setup(self, device):
        self.model = load_model(init_from=self.weights, device="cpu").model

    def decode_request(self, request):
        return request

    def batch(self, inputs):
        return inputs

    def predict(self, requests):
        if isinstance(requests, dict):
            requests = [requests]
        T = max(len(r["prompt"]) for r in requests)
        ids = torch.zeros(len(requests), T, dtype=torch.long)
        mask = torch.zeros(len(requests), T, dtype=torch.bool)
        for i, r in enumerate(requests):  # left padding, as gptlab's batched generation expects
            ids[i, T - len(r["prompt"]):] = torch.tensor(r["prompt"])
            mask[i, T - len(r["prompt"]):] = True
        longest = max(r["max_tokens"] for r in requests)
        out = generate(self.model, ids, longest, attention_mask=mask)[:, T:]
        return [{"tokens": out[i, : r["max_tokens"]].tolist()} for i, r in enumerate(requests)]

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return output


if __name__ == "__main__":
    weights, port, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    api = GenerateAPI(weights, max_batch_size=batch, batch_timeout=0.01)
    ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=600).run(
        host="127.0.0.1", port=port, generate_client_file=False, log_level="warning", num_api_servers=1)
