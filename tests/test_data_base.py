"""The shared DataModule base: hparams saved, one resumable loader for every data module."""

from __future__ import annotations

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from gptlab.data.base import GPTDataModule
from gptlab.data.instruct import InstructionDataModule
from gptlab.data.preference import PreferenceDataModule
from gptlab.data.pretrain import PretrainDataModule
from gptlab.data.prompts import PromptDataModule
from gptlab.data.spam import SpamDataModule
from gptlab.data.synthetic import RandomTokenDataModule

MODULES = {
    "pretrain": lambda: PretrainDataModule(max_length=32, batch_size=4),
    "spam": lambda: SpamDataModule(max_examples=60, batch_size=4),
    "instruct": lambda: InstructionDataModule(max_entries=40, batch_size=4),
    "random": lambda: RandomTokenDataModule(max_length=8, batch_size=4, num_train=40, num_val=8),
    "preference": lambda: PreferenceDataModule(max_entries=40, batch_size=4),
    "prompts": lambda: PromptDataModule(max_entries=40, batch_size=4),
}


@pytest.mark.parametrize("name", MODULES)
def test_every_data_module_keeps_its_arguments_and_makes_stateful_loaders(name):
    dm = MODULES[name]()
    assert isinstance(dm, GPTDataModule) and dm.hparams.batch_size == 4 and "tokenizer" not in dm.hparams
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):  # one _loader for all
        assert isinstance(loader, StatefulDataLoader)
    assert dm.train_dataloader().drop_last and not dm.val_dataloader().drop_last


def test_a_loader_remade_for_distributed_training_raises_no_torchdata_deprecation():
    """Lightning remakes each loader with a DistributedSampler under trainer=ddp; torchdata then calls
    torch.set_vital (deprecated in torch 2.13) outside gptlab's code: that warning stays off the console."""
    import warnings

    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data.distributed import DistributedSampler

    dm = MODULES["random"]()
    dm.setup("fit")
    loader = dm.train_dataloader()
    with warnings.catch_warnings(record=True) as seen:
        remade = _update_dataloader(loader, DistributedSampler(loader.dataset, num_replicas=2, rank=0))
    assert isinstance(remade, StatefulDataLoader)
    assert not [w for w in seen if "set_vital" in str(w.message)], [str(w.message) for w in seen]


def ids(batches) -> list[list[int]]:
    return [b["input_ids"][:, 0].tolist() for b in batches]


def test_a_loader_restored_mid_epoch_continues_with_the_same_batches_into_the_next_epoch():
    torch.manual_seed(0)
    dm = PretrainDataModule(max_length=32, batch_size=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    n = len(loader)
    it = iter(loader)
    head = [next(it) for _ in range(5)]
    state = loader.state_dict()
    rest = list(it) + list(loader)  # the rest of epoch 0, then all of epoch 1
    torch.manual_seed(99)  # a resumed process: the global RNG is somewhere else
    restored = dm.train_dataloader()
    restored.load_state_dict(state)
    again = list(restored) + list(restored)
    assert len(head) + len(rest) == 2 * n
    assert ids(again) == ids(rest)
