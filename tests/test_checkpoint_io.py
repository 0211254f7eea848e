"""Checkpoint files: atomic writes, checksums verified before loading, no partial files left."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from faults import FullDiskCheckpointIO, TorchFullDiskCheckpointIO, corrupt_tensor_bytes
from conftest import small_filesystem
from gptlab import checkpoint_io
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


def test_torchs_own_full_disk_error_is_reported_as_no_space_left(tmp_path):
    """``torch.save`` turns the write's ENOSPC into ``RuntimeError: [enforce fail at
    inline_container.cc:672] . unexpected pos ...``; the message says what happened."""
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(5), path)
    with pytest.raises(CheckpointWriteError) as e:
        TorchFullDiskCheckpointIO(room=1000).save_checkpoint(checkpoint(10), path)
    assert str(e.value) == (f"could not write checkpoint {path}: no space left on the device; the previous "
                            "last.ckpt, if any, is unchanged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert AtomicCheckpointIO().load_checkpoint(path)["global_step"] == 5


def test_a_read_only_folder_is_reported_as_such_not_as_the_cleanups_error(tmp_path, monkeypatch):
    """On a read-only file system the temporary file cannot be created, and removing it fails too:
    the message names the first failure, not the clean-up's."""
    path = tmp_path / "last.ckpt"

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(checkpoint_io, "open", read_only, raising=False)  # the module's open(tmp, "wb")
    monkeypatch.setattr(checkpoint_io.Path, "unlink", read_only)
    with pytest.raises(CheckpointWriteError, match=rf"could not write checkpoint {path}: read-only file system"):
        AtomicCheckpointIO().save_checkpoint(checkpoint(1), path)


def test_on_a_real_small_and_read_only_file_system(tmp_path):
    with small_filesystem(tmp_path / "disk", "1m") as disk:
        path = disk / "last.ckpt"
        AtomicCheckpointIO().save_checkpoint(checkpoint(1), path)  # 256 KB: fits
        big = {"global_step": 2, "state_dict": {"w": torch.zeros(1024, 1024)}}  # 4 MB: does not
        with pytest.raises(CheckpointWriteError, match=rf"{path}: no space left on the device"):
            AtomicCheckpointIO().save_checkpoint(big, path)
        assert sorted(p.name for p in disk.iterdir()) == ["last.ckpt"]
        assert safe_torch_load(path)["global_step"] == 1
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(CheckpointWriteError, match=rf"{path}: read-only file system"):
            AtomicCheckpointIO().save_checkpoint(checkpoint(3), path)
        assert safe_torch_load(path)["global_step"] == 1


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
