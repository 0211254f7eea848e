"""What the PPO and GRPO tests share: random prompts of a tiny vocabulary as left-padded batches, a
callback that keeps every training step's logged metrics, a seeded CPU fit of N iterations, and one
torch thread per test (tiny models run fastest on one, and a shared machine's other cores stay free)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from gptlab.data.prompt_styles import left_pad


def prompt_loader(n: int, batch_size: int, seed: int = 0, vocab: int = 64) -> DataLoader:
    """``n`` random prompts of 2-5 tokens, in left-padded batches as data=prompts makes them."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]

    def collate(items: list[int]) -> dict:
        ids, mask = left_pad([prompts[i] for i in items], 0)
        return {"prompt_ids": ids, "prompt_attention_mask": mask, "index": torch.tensor(items)}

    return DataLoader(list(range(n)), batch_size=batch_size, shuffle=True, collate_fn=collate, drop_last=True)


class History(L.Callback):
    """Every iteration's logged metrics, as floats."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    def without_timings(self) -> list[dict[str, float]]:
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in self.rows]

    def mean(self, key: str, rows: slice) -> float:
        values = [r[key] for r in self.rows[rows]]
        return sum(values) / len(values)


def fit_iterations(task: L.LightningModule, iterations: int, tmp_path, loader: DataLoader, seed: int = 0,
                   **trainer_kw) -> History:
    """``iterations`` batches of ``loader`` (each ``task.steps_per_iteration`` optimizer steps) on CPU, seeded."""
    history = History()
    L.seed_everything(seed)
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, max_steps=iterations * task.steps_per_iteration,
                        logger=trainer_kw.pop("logger", False), enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1, callbacks=[history],
                        default_root_dir=str(tmp_path), **trainer_kw)
    trainer.fit(task, train_dataloaders=loader)
    assert len(history.rows) == iterations
    return history


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
