"""Fault injection for the reliability tests: checkpoint writers that fail or stall midway, and
weights files that lie (crafted headers, NaN weights, adapter metadata).

Importable by subprocess runs too (the tests put this folder on ``PYTHONPATH``), e.g.
``trainer.plugins=[{_target_:faults.StallingCheckpointIO,at_step:10,marker:/tmp/x}]``.
"""

from __future__ import annotations

import errno
import io
import json
import math
import time
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gptlab.checkpoint_io import AtomicCheckpointIO
from gptlab.model.config import GPTConfig
from gptlab.model.gpt import GPT
from gptlab.model.lora import apply_lora, save_adapter
from gptlab.weights import save_book_state_dict, to_hf_state_dict


def _write_half(checkpoint: dict[str, Any], f: BinaryIO) -> None:
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()


class FullDiskCheckpointIO(AtomicCheckpointIO):
    """Writes half of every checkpoint from optimizer step ``at_step`` on, then fails with ENOSPC,
    as a disk that fills up during the save."""

    def __init__(self, at_step: int = 0):
        super().__init__()
        self.at_step = at_step

    def write(self, checkpoint: dict[str, Any], f: BinaryIO) -> None:
        if checkpoint.get("global_step", 0) < self.at_step:
            return super().write(checkpoint, f)
        _write_half(checkpoint, f)
        raise OSError(errno.ENOSPC, "No space left on device")


class StallingCheckpointIO(AtomicCheckpointIO):
    """Writes half of the checkpoint of optimizer step ``at_step``, creates ``marker`` and sleeps:
    the moment to ``kill -9`` a run in the middle of a save."""

    def __init__(self, at_step: int, marker: str):
        super().__init__()
        self.at_step, self.marker = at_step, Path(marker)

    def write(self, checkpoint: dict[str, Any], f: BinaryIO) -> None:
        if checkpoint.get("global_step") != self.at_step:
            return super().write(checkpoint, f)
        _write_half(checkpoint, f)
        self.marker.write_text(f.name)
        time.sleep(600)


def corrupt_tensor_bytes(path: str | Path, n: int = 4096) -> None:
    """Overwrite ``n`` bytes in the middle of the largest record of a ``torch.save`` archive (a
    tensor's data), leaving the zip structure intact: what a bad disk block or a stray write does."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)  # the local header: 30 bytes + name + extra field, then the data
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start = info.header_offset + 30 + name_len + extra_len
        n = min(n, info.file_size // 2)
        f.seek(start + (info.file_size - n) // 2)
        f.write(b"\xff" * n)



class StallAtStep(L.Callback):
    """Creates ``marker`` and sleeps when optimizer step ``step`` is about to start: the moment to
    ``kill -9`` a run in the middle of training (not during a save)."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, Path(marker)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.marker.write_text(str(self.step))
            time.sleep(600)


# ----------------------------------------------------------------------------- files that lie
def safetensors_parts(path: str | Path) -> tuple[dict[str, Any], bytes]:
    """``(header, data)`` of a ``.safetensors`` file: its JSON header and the bytes after it."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors_parts(path: str | Path, header: Any, data: bytes, length: int | None = None) -> Path:
    """A ``.safetensors`` file of ``header`` (any JSON) and ``data``; ``length``: what the 8-byte
    header length field claims instead of the header's real length."""
    blob = json.dumps(header).encode()
    Path(path).write_bytes((len(blob) if length is None else length).to_bytes(8, "little") + blob + data)
    return Path(path)


def _largest(header: dict[str, Any]) -> str:
    return max((k for k in header if k != "__metadata__"),
               key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])


def _first_two(header: dict[str, Any]) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]


def _lie(edit):
    """A lie that edits the header in place and keeps the data."""
    def apply(header: dict[str, Any], data: bytes) -> tuple[Any, bytes, int | None]:
        edit(header)
        return header, data, None
    return apply


def _shift_back(header: dict[str, Any], by: int = 4) -> None:
    k = _first_two(header)[1]
    header[k]["data_offsets"] = [o - by for o in header[k]["data_offsets"]]


def _flatten(key: str):
    def edit(header: dict[str, Any]) -> None:
        header[key]["shape"] = [math.prod(header[key]["shape"])]
    return edit


SAFETENSORS_LIES: dict[str, tuple[Any, str]] = {
    # name: (rewrite (header, data) -> (header, data, claimed header length), what the refusal says)
    "reversed_offsets": (_lie(lambda h: h[_largest(h)].update(data_offsets=h[_largest(h)]["data_offsets"][::-1])),
                         "the end lies before the start"),
    "offsets_0_to_1e15": (_lie(lambda h: h[_largest(h)].update(data_offsets=[0, 10**15])),
                          "data_offsets [0, 1000000000000000]"),
    "overlapping_tensors": (_lie(_shift_back), "overlaps tensor"),
    "f16_declared_over_f32_bytes": (_lie(lambda h: h[_largest(h)].update(dtype="F16")), "of F16 needs"),
    "tensor_beyond_the_file": (_lie(lambda h: h[_largest(h)].update(shape=[10**6, 10**6],
                                                                    data_offsets=[0, 4 * 10**12])), "ends at byte"),
    "header_length_2_63": (lambda h, d: ({}, b"", 2**63 - 1), "header length field says 9,223,372,036,854,775,807"),
    "header_length_1e12": (lambda h, d: ({}, b"", 10**12), "header length field says 1,000,000,000,000"),
    "header_is_a_json_list": (lambda h, d: ([1, 2], d, None), "its header is a JSON list"),
    "missing_dtype": (_lie(lambda h: h[_largest(h)].pop("dtype")), "has no dtype field"),
    "metadata_not_strings": (_lie(lambda h: h.update(__metadata__={"format": 1})), "__metadata__ must map names"),
    "matrix_declared_1d": (_lie(_flatten("transformer.h.0.attn.c_attn.weight")),
                           "transformer.h.0.attn.c_attn.weight: file [3072] vs model [96, 32]"),
    "embedding_declared_1d": (_lie(_flatten("transformer.wte.weight")), "expected a non-empty 2-D matrix"),
}
"""Every way a crafted ``.safetensors`` header lies that gptlab's reader refuses (as the
``safetensors`` library does), applied to a Hugging Face GPT-2 file with 32-wide layers."""


def write_lying_safetensors(good: str | Path, path: str | Path, lie: str) -> Path:
    """``good`` rewritten with the lie :data:`SAFETENSORS_LIES` names, written to ``path``."""
    header, data = safetensors_parts(good)
    header, data, length = SAFETENSORS_LIES[lie][0](header, data)
    return write_safetensors_parts(path, header, data, length)


def with_non_finite(tensors: dict[str, torch.Tensor], key: str, value: float = float("nan")) -> dict[str, torch.Tensor]:
    """A copy of ``tensors`` where one element of ``tensors[key]`` is ``value`` (NaN or infinity)."""
    out = dict(tensors)
    bad = tensors[key].clone()
    bad.view(-1)[bad.numel() // 2] = value
    out[key] = bad
    return out


TINY_WEIGHTS = dict(vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_layers=1, drop_rate=0.0,
                    qkv_bias=True, tie_weights=False)
"""The shape of :func:`write_weight_files`' model (32 wide: the preset gpt2-tiny's width, so a bare
Hugging Face file needs no ``n_heads``)."""


def write_weight_files(folder: str | Path) -> dict[str, Path]:
    """Weights files good and lying for one tiny GPT (:data:`TINY_WEIGHTS`), by name:

    * ``hf``: a bare Hugging Face ``.safetensors``; ``lie_<name>``: it rewritten by each of
      :data:`SAFETENSORS_LIES`; ``nan_hf``: a NaN in ``transformer.h.0.mlp.c_fc.weight``;
    * ``inf_book``: the book's state dict (``.pth``) with an infinity in ``trf_blocks.0.ff.layers.0.weight``;
    * ``ckpt`` / ``nan_ckpt``: a gptlab training checkpoint (with the optimizer and loop state a
      resume needs), good / with a NaN in ``model.blocks.0.attn.qkv.weight``;
    * ``adapter`` / ``nan_adapter``: a LoRA adapter (rank 2) for the model, good / with a NaN in
      ``blocks.0.mlp.fc.lora_B``; ``adapter_<name>`` for metadata that lies: ``not_json``,
      ``list``, ``rank_1e9``, ``rank_float_1e9``, ``rank_mismatch``; ``adapter_garbage``: not safetensors at all.
    """
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = GPTConfig(**TINY_WEIGHTS)
    model = GPT(config).eval()
    files: dict[str, Path] = {}
    hf = {k: v.contiguous() for k, v in to_hf_state_dict(model).items()}
    save_file(hf, str(d / "tiny.safetensors"))
    files["hf"] = d / "tiny.safetensors"
    for lie in SAFETENSORS_LIES:
        files[f"lie_{lie}"] = write_lying_safetensors(files["hf"], d / f"lie_{lie}.safetensors", lie)
    save_file(with_non_finite(hf, "transformer.h.0.mlp.c_fc.weight"), str(d / "nan.safetensors"))
    files["nan_hf"] = d / "nan.safetensors"
    save_book_state_dict(model, d / "book.pth")
    book = torch.load(d / "book.pth", weights_only=True)
    torch.save(with_non_finite(book, "trf_blocks.0.ff.layers.0.weight", float("inf")), d / "inf_book.pth")
    files["inf_book"] = d / "inf_book.pth"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    ckpt = {"state_dict": state, "gptlab_task": "pretrain", "gptlab_kind": "lm",
            "gptlab_model_config": config.to_dict(), "hyper_parameters": {"model": config.to_dict()},
            "optimizer_states": [], "loops": {}, "global_step": 1, "epoch": 0}
    torch.save(ckpt, d / "tiny.ckpt")
    files["ckpt"] = d / "tiny.ckpt"
    torch.save({**ckpt, "state_dict": with_non_finite(state, "model.blocks.0.attn.qkv.weight")}, d / "nan.ckpt")
    files["nan_ckpt"] = d / "nan.ckpt"

    adapted = apply_lora(GPT(config).eval(), rank=2, alpha=4)
    files["adapter"] = save_adapter(adapted, d / "adapter.safetensors")
    tensors, meta = read_safetensors(files["adapter"])
    lora_config = json.loads(meta["config"])
    save_file(with_non_finite(tensors, "blocks.0.mlp.fc.lora_B"), str(d / "nan_adapter.safetensors"), metadata=meta)
    files["nan_adapter"] = d / "nan_adapter.safetensors"
    for name, config_text in (("not_json", "{rank: 2"), ("list", "[2, 4]"),
                              ("rank_1e9", json.dumps({**lora_config, "rank": 10**9})),
                              ("rank_float_1e9", json.dumps({**lora_config, "rank": 1e9})),
                              ("rank_mismatch", json.dumps({**lora_config, "rank": 3}))):
        save_file(tensors, str(d / f"adapter_{name}.safetensors"), metadata={**meta, "config": config_text})
        files[f"adapter_{name}"] = d / f"adapter_{name}.safetensors"
    (d / "adapter_garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}....")
    files["adapter_garbage"] = d / "adapter_garbage.safetensors"
    return files


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A ``.safetensors`` file's tensors and metadata (read with the ``safetensors`` library)."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


class _FillingFile:
    """A file object that takes ``room`` bytes and then fails as a full disk does (``ENOSPC``)."""

    def __init__(self, f: BinaryIO, room: int):
        self.f, self.room, self.written = f, room, 0

    def write(self, data: bytes) -> int:
        if self.written + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


class TorchFullDiskCheckpointIO(AtomicCheckpointIO):
    """``torch.save`` itself writing into a disk with ``room`` bytes left: torch reports it as
    ``RuntimeError: [enforce fail at inline_container.cc] . unexpected pos ...``."""

    def __init__(self, room: int = 1000):
        super().__init__()
        self.room = room

    def write(self, checkpoint: dict[str, Any], f: BinaryIO) -> None:
        torch.save(checkpoint, _FillingFile(f, self.room))
