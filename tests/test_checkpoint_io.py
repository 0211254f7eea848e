"""Checkpoint files: atomic writes, checksums verified before loading, no partial files left."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from faults import FullDiskCheckpointIO, corrupt_tensor_bytes
from gptlab.weights import safe_torch_load
from gptlab.checkpoint_io import (TMP_MARK, AtomicCheckpointIO, CheckpointWriteError, CorruptCheckpointError,
                                  remove_stale_temp_files, verify_checkpoint)


def checkpoint(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((256, 256), float(step))}}


def test_save_writes_the_file_under_its_name_and_nothing_else(tmp_path):
    path = tmp_path / "ckpts" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(3), path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    assert safe_torch_load(path)["global_step"] == 3


def test_a_full_disk_during_a_save_keeps_the_previous_file_and_removes_the_partial_one(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(5), path)
    with pytest.raises(CheckpointWriteError, match="no space left.*last.ckpt") as e:
        FullDiskCheckpointIO(at_step=10).save_checkpoint(checkpoint(10), path)
    assert e.value.errno == 28  # ENOSPC kept for callers that look at it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    ckpt = AtomicCheckpointIO().load_checkpoint(path)
    assert ckpt["global_step"] == 5 and torch.equal(ckpt["state_dict"]["w"], checkpoint(5)["state_dict"]["w"])


def test_bytes_changed_inside_a_tensor_are_refused_naming_file_and_record(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(1), path)
    corrupt_tensor_bytes(path)
    torch.load(path, weights_only=True)  # torch itself loads it without a word ...
    with pytest.raises(CorruptCheckpointError, match=r"last\.ckpt is corrupted: its record 'archive/data/0'"):
        verify_checkpoint(path)  # ... the checksums do not
    with pytest.raises(CorruptCheckpointError):
        AtomicCheckpointIO().load_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "not a zip"])
def test_truncated_empty_or_foreign_files_are_refused(tmp_path, damage):
    path = tmp_path / "x.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(1), path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "not a zip": b"hello" * 100}[damage])
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        verify_checkpoint(path)


def test_a_missing_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        verify_checkpoint(tmp_path / "nope.ckpt")


def test_temp_files_of_dead_processes_are_removed_on_the_next_save(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = os.uname().nodename
    stale = tmp_path / f".last.ckpt{TMP_MARK}{host}-{dead}"
    live = tmp_path / f".last.ckpt{TMP_MARK}{host}-{os.getppid()}"  # a process that still runs
    stale.write_bytes(b"partial")
    live.write_bytes(b"being written")
    AtomicCheckpointIO().save_checkpoint(checkpoint(2), tmp_path / "last.ckpt")
    assert not stale.exists() and live.exists()
    assert remove_stale_temp_files(tmp_path) == []


def test_a_file_with_code_in_its_pickle_is_refused_without_running_it(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Boom()}, path)
    with pytest.raises(ValueError, match="never loads a file that could run code"):
        safe_torch_load(path)
    assert not (tmp_path / "ran").exists()
