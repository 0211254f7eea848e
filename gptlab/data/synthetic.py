"""Random token batches: for throughput benchmarks, where only shapes matter."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from gptlab.checks import integer
from gptlab.data.base import GPTDataModule


class RandomTokenDataset(Dataset):
    """``num_samples`` windows of uniformly random ids; item i is the same every time (seeded by i)."""

    def __init__(self, num_samples: int, max_length: int, vocab_size: int = 50257, seed: int = 0):
        self.num_samples, self.max_length, self.vocab_size, self.seed = num_samples, max_length, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        ids = torch.randint(0, self.vocab_size, (self.max_length + 1,), generator=g)
        return {"input_ids": ids[:-1], "labels": ids[1:]}


class RandomTokenDataModule(GPTDataModule):
    """Synthetic pretraining data with the same batch contract as ``PretrainDataModule``."""

    RULES = {"max_length": integer(ge=1), "num_train": integer(ge=1), "num_val": integer(ge=1),
             "vocab_size": integer(ge=1)}

    def __init__(self, max_length: int = 1024, batch_size: int = 16, num_train: int = 10_000, num_val: int = 64,
                 vocab_size: int = 50257, num_workers: int = 0, pin_memory: bool = True, shuffle: bool = True,
                 drop_last: bool = True, tokenizer=None):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)
        self.check_hparams()

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        self.train_set = RandomTokenDataset(hp.num_train, hp.max_length, hp.vocab_size, seed=0)
        self.val_set = self.test_set = RandomTokenDataset(hp.num_val, hp.max_length, hp.vocab_size, seed=1)
