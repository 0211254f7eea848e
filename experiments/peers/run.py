"""gptlab against its peers, side by side on one machine: Hugging Face ``generate`` and GPT-2,
a nanoGPT-style training loop, and TRL's ``DPOTrainer``, ``RewardTrainer`` and ``SFTTrainer``.

    python experiments/peers/run.py                    # every comparison, CPU shapes
    python experiments/peers/run.py --quick            # tiny shapes: a smoke test of every code path
    python experiments/peers/run.py --only reward,dpo  # some of them (see --list)
    python experiments/peers/run.py --preset gpu       # GPU-sized shapes, bf16 (experiments/gpu_suite.py)

Every side runs in its own worker process (its peak RSS is its own) and waits at a gate between
timed blocks; the parent lets one side run one block at a time, alternating the order every round
(A B, B A, ...), so load on a shared machine hits both sides alike. Both sides get the same shapes
and the same random weights: a gptlab GPT is written once as a Hugging Face folder
(``gptlab.weights.export.export_hf``) and every side loads that folder (gptlab through ``init_from``
or ``load_backbone``, Hugging Face/TRL through ``from_pretrained``, the nanoGPT-style model by
transposing its Conv1D weights, as nanoGPT's ``from_pretrained`` does).

Ratios are per repetition (peer time / gptlab time of the same round): > 1 means gptlab is faster.
The peer columns need the ``peers`` extra (``pip install -e '.[peers]'``: transformers, TRL); without
it the gptlab sides still run and the peer columns say why they are empty.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

# ----------------------------------------------------------------------------- shapes
# model: a GPTConfig preset + overrides; every benchmark reads its shapes from here
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(
        device="cpu",
        decode=dict(model="gpt2-small", prompt=16, new_tokens=128, reps=3),
        train=dict(model="gpt2-mini", overrides=dict(emb_dim=256, n_heads=4, n_layers=4, context_length=256),
                   batch=4, per_rep=3, reps=5, warmup=2),
        pairs=dict(model="gpt2-mini", prompt=64, response=64, pairs=4, per_rep=2, reps=5, warmup=2),
        sft=dict(model="gpt2-mini", prompt=64, response=64, batch=8, per_rep=2, reps=5, warmup=2),
        fwdbwd=dict(model="gpt2-mini", batch=8, seq=128, per_rep=3, reps=5, warmup=1),
        ppo=dict(model="gpt2-mini", prompts=16, prompt=64, new_tokens=32, epochs=4, minibatches=2, reps=3, warmup=1),
    ),
    "quick": dict(
        device="cpu",
        decode=dict(model="gpt2-tiny", prompt=4, new_tokens=8, reps=2),
        train=dict(model="gpt2-tiny", overrides=dict(context_length=32), batch=2, per_rep=1, reps=2, warmup=1),
        pairs=dict(model="gpt2-tiny", prompt=8, response=8, pairs=2, per_rep=1, reps=2, warmup=1),
        sft=dict(model="gpt2-tiny", prompt=8, response=8, batch=2, per_rep=1, reps=2, warmup=1),
        fwdbwd=dict(model="gpt2-tiny", batch=2, seq=16, per_rep=1, reps=2, warmup=1),
        ppo=dict(model="gpt2-tiny", prompts=2, prompt=4, new_tokens=4, epochs=1, minibatches=1, reps=2, warmup=1),
    ),
    "gpu": dict(
        device="cuda",
        decode=dict(model="gpt2-small", prompt=16, new_tokens=128, reps=3),
        train=dict(model="gpt2-small", overrides=dict(context_length=1024), batch=8, per_rep=5, reps=3, warmup=3),
        pairs=dict(model="gpt2-small", prompt=256, response=256, pairs=4, per_rep=3, reps=3, warmup=2),
        sft=dict(model="gpt2-small", prompt=256, response=256, batch=8, per_rep=3, reps=3, warmup=2),
        fwdbwd=dict(model="gpt2-small", batch=8, seq=1024, per_rep=5, reps=3, warmup=2),
        ppo=dict(model="gpt2-small", prompts=16, prompt=64, new_tokens=64, epochs=4, minibatches=2, reps=2, warmup=1),
    ),
}


@dataclass
class Bench:
    """One comparison: the gptlab side first, then the peers (``needs_peer``: skipped without the extra)."""

    name: str
    title: str
    sides: list[str]
    needs_peer: bool = True


BENCHES = [
    Bench("decode", "batch-1 greedy decode", ["gptlab", "hf_generate", "nocache_loop"]),
    Bench("train", "training step (`gptlab-train` path)", ["gptlab", "nanogpt"], needs_peer=False),
    Bench("dpo", "DPO step, reference = copy", ["gptlab", "trl"]),
    Bench("reward", "reward-model step", ["gptlab", "gptlab_unfused", "trl"]),
    Bench("sft", "SFT step", ["gptlab", "trl"]),
    Bench("fwdbwd", "model forward + backward alone", ["gptlab", "hf"]),
    Bench("ppo", "PPO update vs the model's own training rate", ["gptlab", "train_rate"], needs_peer=False),
]
SIDE_LABELS = {"gptlab": "gptlab", "gptlab_unfused": "gptlab, `fused=false`", "hf_generate": "HF `generate`",
               "nocache_loop": "no-cache loop", "nanogpt": "nanoGPT-style loop", "trl": "TRL", "hf": "HF GPT-2",
               "train_rate": "training rate"}
PEER_SIDES = {"hf_generate", "trl", "hf"}
"""Sides that need the ``peers`` extra (transformers, TRL)."""


# ============================================================================= worker side
def make_gate(spec: dict[str, Any], device: str):
    import gate
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else None
    gate.GATE = gate.Gate(spec.get("warmup", 1), spec.get("per_rep", 1), spec["reps"], sync)
    return gate.GATE


def compose_train(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from gptlab.cli import CONFIG_DIR, register_model_presets

    register_model_presets()

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def gptlab_train_overrides(spec: dict, device: str, weights: str, out: str, total: int) -> list[str]:
    """The part every gptlab-train side shares: the model from the shared weights, the default
    callbacks and logger, no validation, and the gate."""
    return [f"model={spec['model']}", "model.drop_rate=0.0", f"init_from={weights}", f"paths.output_dir={out}",
            f"trainer={'gpu' if device == 'cuda' else 'cpu'}", f"trainer.max_steps={total}",
            "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
            "+callbacks.peers_gate._target_=gate.GateCallback"]


def run_gptlab_train(overrides: list[str], g) -> None:
    """Fit through ``gptlab.cli.train.train``: what ``gptlab-train`` runs, with the default callbacks
    (and the gate, which also records the shapes the model reads)."""
    from gptlab.cli.train import train

    train(compose_train(overrides))


def write_pairs(path: Path, spec: dict, n: int) -> list[dict[str, str]]:
    """``n`` preference pairs whose prompt and responses are ``spec['prompt']`` / ``spec['response']``
    GPT-2 tokens (" a" is one token), as JSON lines for gptlab; returned for TRL."""
    rows = [{"prompt": " x" * spec["prompt"], "chosen": " a" * spec["response"], "rejected": " b" * spec["response"]}
            for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def hf_common(spec: dict, device: str, out: str, total: int, batch: int) -> dict[str, Any]:
    """TrainingArguments both TRL sides share. TRL's defaults turn on gradient checkpointing and bf16
    (on CPU too); both are off so TRL does the same work as gptlab (fp32, no recomputation)."""
    return dict(output_dir=out, per_device_train_batch_size=batch, max_steps=total, report_to="none",
                save_strategy="no", use_cpu=device == "cpu", bf16=device == "cuda", gradient_checkpointing=False,
                dataloader_num_workers=0, seed=0)


def hf_gate_callback(g):
    from transformers import TrainerCallback

    class HFGate(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            g.tick(state.global_step)

    return HFGate()


def hf_tokenizer(weights: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(weights)
    tok.pad_token = tok.eos_token
    return tok


def worker(bench: str, side: str, preset: str, weights: str, work: str) -> None:
    import torch

    p = PRESETS[preset]
    device = p["device"]
    torch.manual_seed(0)
    if bench == "decode":
        spec = p["decode"]
        g = make_gate({**spec, "warmup": 1, "per_rep": 1}, device)
        prompt = torch.randint(0, 50257, (1, spec["prompt"]), generator=torch.Generator().manual_seed(1)).to(device)
        n = spec["new_tokens"]
        if side == "hf_generate":
            from transformers import GPT2LMHeadModel

            model = GPT2LMHeadModel.from_pretrained(weights).to(device).eval()
            model.generation_config.eos_token_id = None  # never stop early: every side makes n tokens
            model.generation_config.pad_token_id = 50256

            def step(n=n):
                return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                      do_sample=False)[0, spec["prompt"]:]
        else:
            from gptlab.model.generation import generate
            from gptlab.weights.checkpoint import load_backbone

            model = load_backbone(weights).to(device).eval()
            if side == "gptlab":
                def step(n=n):
                    return generate(model, prompt, n)[0, spec["prompt"]:]
            else:  # the book's generate_text_simple: the whole sequence through the model for every token
                @torch.inference_mode()
                def step(n=n):
                    idx = prompt
                    for _ in range(n):
                        nxt = model(idx)[:, -1].argmax(-1, keepdim=True)
                        idx = torch.cat([idx, nxt], dim=1)
                    return idx[0, spec["prompt"]:]
        tokens = None
        for i in range(g.total_steps):
            g.tick(i)
            tokens = step() if i else step(min(n, 8))  # a short warm-up call: allocator, caches
        g.info.update(tokens=tokens.tolist(), shapes=[[1, spec["prompt"]]], tokens_per_rep=n)
    elif bench == "train":
        spec = p["train"]
        g = make_gate(spec, device)
        ctx = spec["overrides"]["context_length"]
        g.info["tokens_per_rep"] = spec["batch"] * ctx * spec["per_rep"]
        if side == "gptlab":
            overrides = [*gptlab_train_overrides(spec, device, weights, work, g.total_steps),
                         *[f"model.{k}={v}" for k, v in spec["overrides"].items()],
                         "data=random", f"data.batch_size={spec['batch']}", "data.num_workers=0",
                         "task.sample_prompt=null"]
            run_gptlab_train(overrides, g)
        else:
            from nanogpt_loop import train_nanogpt

            train_nanogpt(weights, spec, device, g)
    elif bench in ("dpo", "reward"):
        spec = p["pairs"]
        g = make_gate(spec, device)
        n = (g.total_steps + 2) * spec["pairs"] * 2  # gptlab trains on the first 85%
        rows = write_pairs(Path(work) / "pairs.jsonl", spec, n)
        g.info["seconds_per"] = spec["per_rep"]
        if side.startswith("gptlab"):
            task = ["task=dpo", "task.reference=copy", "task.grad_clip=1.0"] if bench == "dpo" else ["task=reward_model"]
            if side == "gptlab_unfused":
                task.append("task.optimizer.fused=false")
            overrides = [*gptlab_train_overrides(spec, device, weights, work, g.total_steps), *task,
                         "data=preference", f"data.path={work}/pairs.jsonl", "data.prompt_style=raw",
                         f"data.batch_size={spec['pairs']}", f"model.context_length={spec['prompt'] + spec['response']}"]
            run_gptlab_train(overrides, g)
        else:
            from datasets import Dataset

            tok = hf_tokenizer(weights)
            # TRL appends the end-of-text to each response: one word less gives the same length
            data = Dataset.from_list([{**r, "chosen": r["chosen"][2:], "rejected": r["rejected"][2:]} for r in rows])
            common = hf_common(spec, device, work, g.total_steps, spec["pairs"])
            if bench == "dpo":
                from transformers import AutoModelForCausalLM
                from trl import DPOConfig, DPOTrainer

                model = AutoModelForCausalLM.from_pretrained(weights)
                trainer = DPOTrainer(model=model, ref_model=None, args=DPOConfig(**common, beta=0.1, learning_rate=5e-6),
                                     train_dataset=data, processing_class=tok, callbacks=[hf_gate_callback(g)])
            else:
                from transformers import AutoModelForSequenceClassification
                from trl import RewardConfig, RewardTrainer

                model = AutoModelForSequenceClassification.from_pretrained(weights, num_labels=1)
                model.config.pad_token_id = tok.pad_token_id
                trainer = RewardTrainer(model=model, args=RewardConfig(**common, learning_rate=1e-5),
                                        train_dataset=data, processing_class=tok, callbacks=[hf_gate_callback(g)])
            g.watch(model.get_input_embeddings())
            trainer.train()
    elif bench == "sft":
        spec = p["sft"]
        g = make_gate(spec, device)
        n = (g.total_steps + 2) * spec["batch"] * 2
        rows = [{"instruction": " x" * spec["prompt"], "input": "", "output": " a" * spec["response"]} for _ in range(n)]
        if side == "gptlab":
            (Path(work) / "sft.json").write_text(json.dumps(rows))
            overrides = [*gptlab_train_overrides(spec, device, weights, work, g.total_steps), "task=instruct",
                         "task.grad_clip=1.0", "data=instruct", f"data.path={work}/sft.json", "data.prompt_style=raw",
                         f"data.batch_size={spec['batch']}", f"model.context_length={spec['prompt'] + spec['response']}"]
            run_gptlab_train(overrides, g)
        else:
            from datasets import Dataset
            from transformers import AutoModelForCausalLM
            from trl import SFTConfig, SFTTrainer

            tok = hf_tokenizer(weights)
            data = Dataset.from_list([{"prompt": r["instruction"], "completion": r["output"][2:]} for r in rows])
            model = AutoModelForCausalLM.from_pretrained(weights)
            trainer = SFTTrainer(model=model, args=SFTConfig(**hf_common(spec, device, work, g.total_steps, spec["batch"]),
                                                             learning_rate=5e-5),
                                 train_dataset=data, processing_class=tok, callbacks=[hf_gate_callback(g)])
            g.watch(model.get_input_embeddings())
            trainer.train()
    elif bench == "fwdbwd":
        spec = p["fwdbwd"]
        g = make_gate(spec, device)
        ids = torch.randint(0, 50257, (spec["batch"], spec["seq"] + 1), generator=torch.Generator().manual_seed(2))
        ids = ids.to(device)
        x, y = ids[:, :-1], ids[:, 1:]
        autocast = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
        if side == "gptlab":
            from gptlab.weights.checkpoint import load_backbone

            model = load_backbone(weights, drop_rate=0.0).to(device).train()
            g.watch(model.tok_emb)

            def loss():
                return model.loss(x, y)
        else:
            from transformers import GPT2LMHeadModel

            model = GPT2LMHeadModel.from_pretrained(weights).to(device).train()
            g.watch(model.transformer.wte)

            def loss():
                return model(input_ids=x, labels=x).loss  # HF shifts the labels itself: the same targets
        for i in range(g.total_steps):
            g.tick(i)
            with autocast:
                value = loss()
            value.backward()
            model.zero_grad(set_to_none=True)
    elif bench == "ppo":
        spec = p["ppo"]
        if side == "gptlab":
            g = make_gate({**spec, "per_rep": 1}, device)
            ppo_worker(spec, device, g)
        else:
            steps = spec["epochs"] * spec["minibatches"]
            g = make_gate({**spec, "per_rep": steps}, device)
            train_rate_worker(spec, device, g)
    else:
        raise SystemExit(f"unknown benchmark {bench!r}")
    g.done()


def ppo_shapes(spec: dict) -> tuple[int, int, int]:
    """Rows per minibatch, tokens per row (prompt + response), response tokens per row."""
    return spec["prompts"] // spec["minibatches"], spec["prompt"] + spec["new_tokens"], spec["new_tokens"]


def ppo_worker(spec: dict, device: str, g) -> None:
    """The PPO task (``gptlab.tasks.ppo.PPOTask``) through a Lightning Trainer, as ``ppo_speed`` runs it;
    a repetition is one iteration's update phase, as the task times it (``time/update_s``)."""
    import importlib.util

    import lightning as L

    from gptlab.callbacks import NonFiniteGuard
    from gptlab.model.config import GPTConfig
    from gptlab.tasks.ppo import PPOTask

    loaded = importlib.util.spec_from_file_location("ppo_speed", ROOT / "experiments" / "ppo_speed" / "run.py")
    ppo_speed = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(ppo_speed)
    L.seed_everything(0, verbose=False)
    config = GPTConfig.from_name(spec["model"], drop_rate=0.0)
    task = PPOTask(model=config.to_dict(), reward=ppo_speed.RandomRewardModel(config), max_new_tokens=spec["new_tokens"],
                   temperature=0.7, stop_token_id=None, ppo_epochs=spec["epochs"], num_mini_batches=spec["minibatches"],
                   optimizer={"lr": 1e-6}, lr_schedule={"name": "constant"}, log_samples_every_n=0)
    iterations = g.warmup + g.reps

    class Report(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx >= g.warmup:
                g.wait()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx >= g.warmup:
                g.report(float(trainer.callback_metrics["time/update_s"]))

    trainer = L.Trainer(accelerator=device, devices=1, precision="bf16-mixed" if device == "cuda" else "32-true",
                        max_epochs=1, limit_train_batches=iterations, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        callbacks=[Report(), NonFiniteGuard()])
    data = ppo_speed.prompts(iterations * spec["prompts"], spec["prompts"], spec["prompt"], config.vocab_size)
    trainer.fit(task, train_dataloaders=data)
    rows, T, R = ppo_shapes(spec)
    g.info.update(shapes=[[rows, T]], flops_per_rep=ppo_update_flops(config, spec),
                  fused=bool(trainer.optimizers[0].param_groups[0].get("fused")))


def train_rate_worker(spec: dict, device: str, g) -> None:
    """The same model's plain training step (forward + next-token loss over every position +
    backward + clipping + the task's AdamW) on a PPO minibatch's shape: its FLOP rate."""
    import torch

    from gptlab.model.config import GPTConfig
    from gptlab.model.gpt import GPT
    from gptlab.optim import DEFAULT_OPTIMIZER, build_optimizer, parameter_groups

    config = GPTConfig.from_name(spec["model"], drop_rate=0.0)
    model = GPT(config).to(device).train()
    opt = build_optimizer({**DEFAULT_OPTIMIZER, "lr": 1e-6}, parameter_groups(model, 0.1))
    rows, T, _ = ppo_shapes(spec)
    ids = torch.randint(0, config.vocab_size, (rows, T + 1), device=device)
    g.watch(model.tok_emb)
    autocast = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    for i in range(g.total_steps):
        g.tick(i)
        with autocast:
            loss = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    g.info.update(flops_per_rep=g.per_rep * train_step_flops(config, rows, T), fused=bool(opt.param_groups[0].get("fused")))


def matmul_params(config) -> tuple[int, int]:
    """Weights a token multiplies through: (the transformer blocks, the output head)."""
    D, L = config.emb_dim, config.n_layers
    return L * (3 * D * D + D * D + 2 * config.mlp_ratio * D * D), config.vocab_size * D


def train_step_flops(config, rows: int, T: int) -> float:
    """Forward + backward FLOPs of next-token training on ``rows`` x ``T`` (6 per weight and token,
    12·L·D·T per token for attention, PaLM appendix B)."""
    blocks, head = matmul_params(config)
    tokens = rows * T
    return 6 * (blocks + head) * tokens + 12 * config.n_layers * config.emb_dim * T * tokens


def ppo_update_flops(config, spec: dict) -> float:
    """FLOPs of one PPO update: ``epochs`` x ``minibatches`` forward + backward passes over the
    minibatch's prompt + response tokens, the output head only at the response positions."""
    blocks, head = matmul_params(config)
    rows, T, R = ppo_shapes(spec)
    per_minibatch = (6 * blocks * rows * T + 12 * config.n_layers * config.emb_dim * T * rows * T
                     + 6 * head * rows * R)
    return spec["epochs"] * spec["minibatches"] * per_minibatch


# ============================================================================= parent side
class Side:
    """A worker process of one side: started, fed 'rep', read back."""

    def __init__(self, bench: str, side: str, args: argparse.Namespace, weights: str, work: Path):
        self.name = side
        work.mkdir(parents=True, exist_ok=True)
        self.log_path = work / "worker.log"
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", bench, "--side", side, "--preset",
               args.preset, "--weights", weights, "--work", str(work),
               *[f"--{k}={v}" for k, v in (("reps", args.reps), ("steps", args.steps)) if v]]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, cwd=work)
        self.times: list[float] = []
        self.done: dict[str, Any] = {}

    def expect(self, kind: str) -> Any:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.flush()
            tail = "\n".join(self.log_path.read_text().strip().splitlines()[-25:])
            raise RuntimeError(f"the {self.name} worker stopped (exit code {self.proc.returncode}) waiting for "
                               f"{kind}; its log ({self.log_path}) ends:\n{tail}")
        got, _, payload = line.strip().partition(" ")
        if got != kind:
            raise RuntimeError(f"the {self.name} worker sent {line.strip()!r}, expected {kind}")
        return json.loads(payload) if payload else None

    def rep(self) -> float:
        self.proc.stdin.write("rep\n")
        self.proc.stdin.flush()
        seconds = self.expect("REP")["seconds"]
        self.times.append(seconds)
        return seconds

    def finish(self) -> None:
        self.done = self.expect("DONE")
        self.proc.wait()
        self.log.close()


def peers_available() -> str | None:
    """None when transformers and TRL import, else why the peer columns are empty."""
    import importlib.util

    missing = [m for m in ("transformers", "trl", "datasets") if importlib.util.find_spec(m) is None]
    return (f"{', '.join(missing)} not installed: peer columns skipped (pip install -e '.[peers]')"
            if missing else None)


def export_weights(name: str, overrides: dict[str, Any], out: Path) -> str:
    """A random gptlab GPT (seed 0) written as a Hugging Face folder every side loads."""
    import torch

    from gptlab.model.config import GPTConfig
    from gptlab.model.gpt import GPT
    from gptlab.weights.export import export_hf

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(name, **{"drop_rate": 0.0, **overrides}))
    return str(export_hf(model, out))


def run_bench(b: Bench, args: argparse.Namespace, tmp: Path, skip_peers: str | None) -> dict[str, Any]:
    p = PRESETS[args.preset]
    spec = p[{"dpo": "pairs", "reward": "pairs"}.get(b.name, b.name)]
    sides = [s for s in b.sides if not (skip_peers and s in PEER_SIDES)]
    weights = ""
    if b.name != "ppo":
        weights = export_weights(spec["model"], spec.get("overrides", {}), tmp / f"weights-{b.name}")
    started = time.perf_counter()
    workers = [Side(b.name, s, args, weights, tmp / f"{b.name}-{s}") for s in sides]
    try:
        for w in workers:
            w.expect("WAIT")
        for r in range(spec["reps"]):
            for w in (workers if r % 2 == 0 else workers[::-1]):  # A B, then B A: drift hits both alike
                w.rep()
                if r < spec["reps"] - 1:
                    w.expect("WAIT")
        for w in workers:
            w.finish()
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
    return dict(bench=b, spec=spec, workers=workers, wall=time.perf_counter() - started)


def fmt_ms(seconds: float) -> str:
    return f"{1000 * seconds:,.0f} ms" if seconds >= 0.01 else f"{1000 * seconds:.2f} ms"


def describe(result: dict[str, Any]) -> tuple[str, list[str], list[str]]:
    """The summary row(s) and the per-repetition table of one comparison."""
    b, spec, workers = result["bench"], result["spec"], result["workers"]
    by = {w.name: w for w in workers}
    g = by["gptlab"]
    shape = ", ".join("×".join(map(str, s)) for s in g.done.get("shapes", []))
    per = spec.get("per_rep", 1)

    def unit(w: Side, t: float) -> str:
        if b.name == "decode":
            return f"{spec['new_tokens'] / t:.1f} tok/s"
        if b.name == "train":
            return f"{w.done['tokens_per_rep'] / t:,.0f} tok/s"
        if b.name == "ppo":
            return fmt_ms(t) if w.name == "gptlab" else f"{w.done['flops_per_rep'] / t / 1e9:.1f} GFLOP/s"
        return fmt_ms(t / per) + "/step"

    rows, detail = [], []
    reps = len(g.times)
    head = "| rep | " + " | ".join(SIDE_LABELS[w.name] for w in workers) + " |"
    detail.append(head)
    detail.append("|---" * (len(workers) + 1) + "|")
    for r in range(reps):
        detail.append(f"| {r + 1} | " + " | ".join(f"{unit(w, w.times[r])} ({w.times[r]:.3f} s)" for w in workers) + " |")
    for w in workers[1:]:
        if b.name == "ppo":
            # the share of the training FLOP rate the PPO update reaches, per round
            ratios = [(g.done["flops_per_rep"] / g.times[r]) / (w.done["flops_per_rep"] / w.times[r]) for r in range(reps)]
            predicted = statistics.median(g.done["flops_per_rep"] / (w.done["flops_per_rep"] / t) for t in w.times)
            rows.append(f"| {b.title} | {shape} | {fmt_ms(statistics.median(g.times))} | "
                        f"{SIDE_LABELS[w.name]} {statistics.median(w.done['flops_per_rep'] / t for t in w.times) / 1e9:.1f} "
                        f"GFLOP/s predicts {fmt_ms(predicted)} | {statistics.median(ratios):.2f}× of it "
                        f"({min(ratios):.2f}–{max(ratios):.2f}) | {g.done['rss_mb']:,.0f} / {w.done['rss_mb']:,.0f} |")
            continue
        ratios = [w.times[r] / g.times[r] for r in range(reps)]
        wshape = ", ".join("×".join(map(str, s)) for s in w.done.get("shapes", []))
        same = "" if wshape == shape else f" (peer: {wshape})"
        rows.append(f"| {b.title} | {shape}{same} | {unit(g, statistics.median(g.times))} | "
                    f"{SIDE_LABELS[w.name]} {unit(w, statistics.median(w.times))} | "
                    f"**{statistics.median(ratios):.2f}×** ({min(ratios):.2f}–{max(ratios):.2f}) | "
                    f"{g.done['rss_mb']:,.0f} / {w.done['rss_mb']:,.0f} |")
        detail.append(f"\n{SIDE_LABELS[w.name]} / gptlab per repetition: "
                      + ", ".join(f"{x:.2f}" for x in ratios))
    if b.name == "decode":
        tokens = {w.name: w.done.get("tokens") for w in workers}
        same = all(t == tokens["gptlab"] for t in tokens.values())
        detail.append(f"\nsame greedy tokens on every side: {same}")
    times = "; ".join(f"{SIDE_LABELS[w.name]} min/median/max {min(w.times):.3f}/{statistics.median(w.times):.3f}/"
                      f"{max(w.times):.3f} s" for w in workers)
    detail.append(f"\nper repetition ({per} step{'s' if per > 1 else ''}): {times}")
    return b.name, rows, detail


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores ({cpu})"
    versions = [f"torch {torch.__version__}"]
    for mod in ("lightning", "transformers", "trl"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            versions.append(f"{mod} not installed")
    return (f"{dev}, {torch.get_num_threads()} torch threads; {', '.join(versions)}; "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the start")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="shapes (default cpu; --quick = quick)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 repetitions: checks every code path")
    ap.add_argument("--only", default=None, help="comma-separated comparisons (see --list)")
    ap.add_argument("--list", action="store_true", help="print the comparisons and exit")
    ap.add_argument("--no-peers", action="store_true", help="the gptlab sides only (a smoke test of gptlab's code paths)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per side (default: the preset's)")
    ap.add_argument("--steps", type=int, default=None, help="steps per repetition (default: the preset's)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.preset = args.preset or ("quick" if args.quick else "cpu")
    for spec in PRESETS[args.preset].values():  # a loaded machine: fewer or shorter repetitions
        if isinstance(spec, dict):
            spec.update({k: v for k, v in (("reps", args.reps), ("per_rep", args.steps)) if v and "reps" in spec})
    if args.worker:
        worker(args.worker, args.side, args.preset, args.weights, args.work)
        return 0
    if args.list:
        for b in BENCHES:
            print(f"{b.name:8s} {b.title}: {' vs '.join(SIDE_LABELS[s] for s in b.sides)}")
        return 0
    chosen = BENCHES
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {b.name for b in BENCHES})
        if unknown:
            ap.error(f"unknown comparison(s) {unknown}; valid: {[b.name for b in BENCHES]}")
        chosen = [b for b in BENCHES if b.name in names]
    if PRESETS[args.preset]["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--preset gpu needs a CUDA device", file=sys.stderr)
            return 2
    skip_peers = "--no-peers: peer columns skipped" if args.no_peers else peers_available()
    print(f"# gptlab vs peers ({args.preset} preset)\n\n- machine: {machine()}")
    if skip_peers:
        print(f"- {skip_peers}")
    print("", flush=True)
    summary = ["| step | shape (batch × tokens the model reads) | gptlab | peer | ratio, median (min–max) | "
               "peak RSS MiB, gptlab / peer |", "|---|---|---:|---:|---:|---:|"]
    details: list[str] = []
    failures = 0
    with tempfile.TemporaryDirectory(prefix="gptlab-peers-") as tmp:
        for b in chosen:
            print(f"[peers] {b.name} ...", file=sys.stderr, flush=True)
            try:
                result = run_bench(b, args, Path(tmp), skip_peers if b.needs_peer else None)
            except RuntimeError as e:
                failures += 1
                summary.append(f"| {b.title} | failed | | | | |")
                details.append(f"\n### {b.name}: failed\n\n```\n{e}\n```")
                print(f"[peers] {b.name} failed: {e}", file=sys.stderr, flush=True)
                continue
            name, rows, detail = describe(result)
            if not rows:
                rows = [f"| {b.title} | | gptlab only | {skip_peers} | | |"]
            summary.extend(rows)
            details.append(f"\n### {name} ({result['wall']:.0f} s)\n\n" + "\n".join(detail))
            # each comparison as soon as it is done: a time cap that stops the run keeps these
            print("\n".join([*summary[:2], *rows, details[-1], ""]), flush=True)
            print(f"[peers] {b.name} done in {result['wall']:.0f} s", file=sys.stderr, flush=True)
    print("## All comparisons\n\n" + "\n".join(summary))
    print("\n## Repetitions\n" + "\n".join(details))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
