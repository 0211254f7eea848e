"""Write the checkpoints of ``tests/data/legacy/``: what gptlab wrote before the reference model's
state moved under one checkpoint key (issue 21). Run with the code of that time (main d44eb15):

    git archive d44eb15 | tar -x -C /tmp/gptlab-d44eb15
    PYTHONPATH=/tmp/gptlab-d44eb15 python tests/data/legacy/make_checkpoints.py tests/data/legacy

* ``ppo_copy.ckpt``: PPO from scratch, reference ``copy`` (its weights under ``ppo_reference_state``);
* ``dpo_copy.ckpt``: DPO from scratch, reference ``copy`` (``dpo_reference_state``);
* ``dpo_precomputed.ckpt``: DPO, reference ``precomputed`` (``dpo_ref_logps``).

A 64-token vocabulary, one 16-wide block: every file stays below 200 kB.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from gptlab.tasks.dpo import DPOTask
from gptlab.tasks.ppo import PPOTask

MODEL = dict(vocab_size=64, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)
TRAIN = dict(lr=1e-2, lr_schedule="constant", weight_decay=0.0)


def pairs(n: int = 8) -> list[dict[str, torch.Tensor]]:
    """Preference items of 6 tokens, the first two a masked prompt."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        item = {"index": torch.tensor(i)}
        for side in ("chosen", "rejected"):
            ids = torch.randint(1, 64, (6,), generator=g)
            labels = torch.cat([ids[1:], torch.tensor([0])])
            labels[:1] = -100
            item[f"{side}_input_ids"], item[f"{side}_labels"] = ids, labels
        items.append(item)
    return items


class Pairs(L.LightningDataModule):
    """What ``reference=precomputed`` needs of a data module: ordered loaders and fingerprints."""

    def __init__(self):
        super().__init__()
        self.items = pairs()

    def fingerprint(self, split: str) -> str:
        return f"legacy-{split}"

    def ordered_dataloader(self, split: str) -> DataLoader:
        return DataLoader(self.items, batch_size=4)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=4)


def prompts() -> DataLoader:
    ids = torch.randint(1, 64, (8, 3), generator=torch.Generator().manual_seed(1))
    batch = [{"prompt_ids": row, "prompt_attention_mask": torch.ones(3, dtype=torch.long), "index": torch.tensor(i)}
             for i, row in enumerate(ids)]
    return DataLoader(batch, batch_size=8)


def trainer(root: Path, steps: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, default_root_dir=str(root))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ppo = PPOTask(model=MODEL, reward=lambda completion_ids, **_: [float(len(c)) for c in completion_ids],
                  max_new_tokens=4, temperature=1.0, stop_token_id=None, ppo_epochs=1, log_samples_every_n=0, **TRAIN)
    t = trainer(out / "ppo_run", 1)
    t.fit(ppo, train_dataloaders=prompts())
    t.save_checkpoint(out / "ppo_copy.ckpt")
    for mode in ("copy", "precomputed"):
        torch.manual_seed(0)
        dpo = DPOTask(model=MODEL, reference=mode, generate_on_test=False, **TRAIN)
        t = trainer(out / f"dpo_{mode}_run", 2)
        t.fit(dpo, datamodule=Pairs())
        t.save_checkpoint(out / f"dpo_{mode}.ckpt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
