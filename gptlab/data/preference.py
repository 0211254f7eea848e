"""Preference pairs for DPO and reward models (the book's chapter 7 DPO bonus and chapter 8).

Two entry formats, in a JSON list file or a JSON-lines file (``.jsonl``, one entry per line):

* the book's ``instruction-data-with-preference.json`` (shipped in ``gptlab/assets``, the default):
  ``{"instruction", "input", "output", "chosen", "rejected"}``;
* plain pairs ``{"prompt", "chosen", "rejected"}`` (Anthropic-HH style or your own): ``prompt`` is
  the instruction, written with ``prompt_style`` like SFT data (``prompt_style=raw`` uses it verbatim,
  for prompts that carry their own ``Human:``/``Assistant:`` turns).

An optional numeric ``margin`` per entry (all entries or none) is passed to reward models (TRL's
``margin`` column). Each side is tokenized as ``prompt + response`` exactly like
:mod:`gptlab.data.instruct`; the collate pads chosen and rejected to ONE common length (so a task
can run both through the model in one forward pass) and masks the prompt and the padding in
``chosen_labels`` / ``rejected_labels``: the positions left are the response tokens whose
log-probabilities DPO compares.

Book parity (``experiment=ch07_dpo``): the book's DPO mask also scores the response header after
its leading newlines (``"### Response:\\n"``, ``mask[:len(prompt) + 2] = False``) and does not score
the end-of-text after the response: ``score_response_header=true score_eos=false``.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from gptlab.checks import boolean, integer
from gptlab.data.instruct import InstructionTestCollate, instruction_collate
from gptlab.data.prompt_styles import get_prompt_style
from gptlab.data.records import (DEFAULT_MAX_RECORD_BYTES, DataFileError, RecordDataModule, read_json_records,
                                 starts_beyond)
from gptlab.tokenizer import ASSETS, EOT_ID, get_tokenizer

DEFAULT_PREFERENCE_DATA = ASSETS / "instruction-data-with-preference.json"
PAIR_KEYS = ("chosen", "rejected")
SPLITS = ("train", "val", "test")


class PreferenceDataError(DataFileError):
    """A malformed preference file or entry (the message names the file and the entry index)."""


# ----------------------------------------------------------------------------- loading
def normalize_pair(entry: Any, where: str) -> dict[str, Any]:
    """One entry as ``{"instruction", "input", "chosen", "rejected", ...}`` (other keys kept);
    a ``{"prompt", ...}`` entry gets ``instruction=prompt, input=""``. ``where`` starts messages."""
    if not isinstance(entry, dict):
        raise PreferenceDataError(f"{where} must be an object with 'chosen', 'rejected' and 'prompt' "
                                  f"(or 'instruction' + 'input'), got {type(entry).__name__}")
    for key in PAIR_KEYS:
        if not isinstance(entry.get(key), str):
            got = type(entry[key]).__name__ if key in entry else "nothing"
            raise PreferenceDataError(f"{where} needs a string {key!r}, got {got} (keys: {sorted(entry)})")
        if not entry[key].strip():
            raise PreferenceDataError(f"{where}: {key!r} is empty")
    out = dict(entry)
    if "prompt" in entry:
        if not isinstance(entry["prompt"], str):
            raise PreferenceDataError(f"{where}: 'prompt' must be a string, got {type(entry['prompt']).__name__}")
        out.setdefault("instruction", entry["prompt"])
        out.setdefault("input", "")
    elif not isinstance(entry.get("instruction"), str):
        raise PreferenceDataError(f"{where} needs a string 'prompt' (or 'instruction'), keys: {sorted(entry)}")
    for key in ("instruction", "input", "output"):
        if key in out and not isinstance(out[key], str):
            raise PreferenceDataError(f"{where}: {key!r} must be a string, got {type(out[key]).__name__}")
    out.setdefault("input", "")
    if "margin" in out and (isinstance(out["margin"], bool) or not isinstance(out["margin"], (int, float))):
        raise PreferenceDataError(f"{where}: 'margin' must be a number, got {out['margin']!r:.60}")
    return out


def load_preference_data(path: str | Path | None = None,
                         max_record_bytes: int | None = DEFAULT_MAX_RECORD_BYTES) -> list[dict[str, Any]]:
    """Normalised entries (see :func:`normalize_pair`) of a preference file (default: the book's
    1,100 pairs). Errors name the file and the entry index (JSON lines: and the line); an entry
    longer than ``max_record_bytes`` is refused."""
    records = read_json_records(path or DEFAULT_PREFERENCE_DATA, "preference data", PreferenceDataError,
                                max_record_bytes)
    entries = [normalize_pair(e, records.where(i)) for i, e in enumerate(records.entries)]
    with_margin = [i for i, e in enumerate(entries) if "margin" in e]
    if with_margin and len(with_margin) != len(entries):
        missing = next(i for i, e in enumerate(entries) if "margin" not in e)
        raise PreferenceDataError(f"{records.where(missing)} has no 'margin' while entry {with_margin[0]} has one: "
                                  "give every entry a margin or none")
    return entries


# ----------------------------------------------------------------------------- dataset + collate
class PreferenceDataset(Dataset):
    """Pairs tokenized once. Item ``i``: ``{"chosen": {"input_ids", "prompt_length"}, "rejected":
    {...}, "index": i}`` (+ ``"margin"``), where ``prompt_length`` counts the leading tokens that are
    not scored (the prompt; with ``score_response_header`` the prompt minus its response header
    after the header's leading newlines). ``prompt_ids`` hold the whole generation prompt."""

    def __init__(self, entries: Sequence[Mapping[str, Any]], tokenizer: Any = None, prompt_style: str = "alpaca",
                 score_response_header: bool = False):
        self.entries = list(entries)
        self.style = get_prompt_style(prompt_style)
        tok = tokenizer or get_tokenizer()
        # ordinary encoding: a literal "<|endoftext|>" in the data is text, never the special id
        self.prompt_ids = tok.encode_ordinary_batch([self.style.prompt(e) for e in self.entries])
        self.response_ids = {k: tok.encode_ordinary_batch([e[k] for e in self.entries]) for k in PAIR_KEYS}
        self.scored_from = [len(p) for p in self.prompt_ids]
        if score_response_header:
            header = self.style.response_header
            newlines = len(header) - len(header.lstrip("\n"))  # each one a token of its own in GPT-2 BPE
            inputs = tok.encode_ordinary_batch([self.style.format_input(e) for e in self.entries])
            for i, (inp, prompt) in enumerate(zip(inputs, self.prompt_ids)):
                if prompt[: len(inp)] != inp:
                    raise PreferenceDataError(f"entry {i}: its prompt does not tokenize as instruction + header, "
                                              "so the header cannot be scored; use score_response_header=false")
            self.scored_from = [len(inp) + newlines for inp in inputs]
        self.has_margin = bool(self.entries) and "margin" in self.entries[0]

    def __len__(self) -> int:
        return len(self.entries)

    def visible(self, side: str, i: int, limit: int | None = None) -> list[int]:
        """The ids of pair ``i``'s ``side`` (``chosen``/``rejected``) that a batch truncated to
        ``limit`` positions shows the model (inputs and targets), the end-of-text target included."""
        ids = self.prompt_ids[i] + self.response_ids[side][i] + [EOT_ID]
        return ids if limit is None else ids[: limit + 1]

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = self.prompt_ids[i]
        item: dict[str, Any] = {k: {"input_ids": p + self.response_ids[k][i], "prompt_length": self.scored_from[i]}
                                for k in PAIR_KEYS}
        item["index"] = i
        if self.has_margin:
            item["margin"] = float(self.entries[i]["margin"])
        return item

    def fingerprint(self) -> str:
        """sha256 of what the collate turns into log-probabilities: every pair's token ids and
        scored start. Cached reference log-probs are reused only for the same fingerprint."""
        h = hashlib.sha256()
        for i in range(len(self)):
            h.update(json.dumps([self.prompt_ids[i], self.scored_from[i], self.response_ids["chosen"][i],
                                 self.response_ids["rejected"][i]]).encode())
        return h.hexdigest()


def preference_collate(batch: Sequence[Mapping[str, Any]], pad_id: int = EOT_ID, ignore_index: int = -100,
                       allowed_max_length: int | None = None, mask_prompt: bool = True,
                       score_eos: bool = True) -> dict[str, torch.Tensor]:
    """Batch pairs: ``chosen_input_ids``, ``chosen_labels``, ``chosen_attention_mask`` and the same
    for ``rejected_``, all (B, T) with ONE T for both sides, plus ``index`` (B,) (and ``margin``
    (B,) float when the items carry one).

    Both sides go through :func:`instruction_collate` as one 2B-row batch (chosen rows first):
    padded with ``pad_id`` to the longest + 1, labels shifted, padding and (``mask_prompt``) the
    first ``prompt_length`` tokens ignored. The end-of-text target after each response is scored
    unless ``score_eos`` is false; ``allowed_max_length`` truncates.
    """
    if not batch:
        raise ValueError("preference_collate got an empty batch")
    B = len(batch)
    both = instruction_collate([item[side] for side in PAIR_KEYS for item in batch], pad_id, ignore_index,
                               None, mask_prompt)
    labels = both["labels"]
    if not score_eos:
        # the end-of-text target of a sequence of length n sits at label position n - 1
        lengths = both["attention_mask"].sum(dim=1)
        labels[torch.arange(2 * B), lengths - 1] = ignore_index
    if allowed_max_length is not None:
        both = {k: v[:, :allowed_max_length].contiguous() for k, v in both.items()}
    out = {f"{side}_{k}": v[i * B:(i + 1) * B] for k, v in both.items() for i, side in enumerate(PAIR_KEYS)}
    out["index"] = torch.tensor([int(item["index"]) for item in batch])
    if "margin" in batch[0]:
        out["margin"] = torch.tensor([float(item["margin"]) for item in batch])
    return out


# ----------------------------------------------------------------------------- data module
class PreferenceDataModule(RecordDataModule):
    """Preference pairs, split like the book (first 85% train, next 10% test, last 5% validate:
    935 / 110 / 55 of the book's 1,100).

    Args:
        mask_prompt: score only the responses (the book's ``mask_prompt_tokens=True``).
        score_response_header: also score the response header after its leading newlines (the book).
        score_eos: score the end-of-text after each response (TRL appends EOS; the book does not).
        allowed_max_length: truncate batches to this many positions (the book: 1024).
        ignore_index: the label of positions without a loss.
        **kwargs: :class:`~gptlab.data.records.RecordDataModule` arguments (``path``: a JSON /
            JSON-lines file of pairs (module docstring), None = the book's; ``prompt_style``: the one
            the SFT model was trained with; the split and loader settings).
    """

    what, unit, default_path = "preference data", "pairs", DEFAULT_PREFERENCE_DATA

    RULES = {"mask_prompt": boolean(), "score_response_header": boolean(), "score_eos": boolean(),
             "allowed_max_length": integer(ge=1, optional=True), "ignore_index": integer()}

    def __init__(self, mask_prompt: bool = True, score_response_header: bool = False, score_eos: bool = True,
                 allowed_max_length: int | None = None, ignore_index: int = -100, **kwargs: Any):
        super().__init__(**kwargs)
        self.score_response_header = score_response_header
        self.collate_kwargs = dict(pad_id=self.pad_id, ignore_index=ignore_index,
                                   allowed_max_length=allowed_max_length, mask_prompt=mask_prompt, score_eos=score_eos)

    def load_entries(self) -> list[dict[str, Any]]:
        return load_preference_data(self.path, self.max_record_bytes)

    def make_dataset(self, entries: list[dict[str, Any]]) -> PreferenceDataset:
        return PreferenceDataset(entries, self.tokenizer, self.prompt_style, self.score_response_header)

    def after_split(self, note: str = "") -> None:
        super().after_split(note)
        self.check_learnable()

    def check_learnable(self) -> None:
        """Pairs that cannot teach a preference: a scored part that starts beyond
        ``allowed_max_length`` (both responses are cut away entirely), or a chosen response equal to
        the rejected one (within what the truncated batch keeps): refused when every training pair
        is such, one warning with the counts when some are
        (:meth:`~gptlab.data.records.RecordDataModule.report_unlearnable`)."""
        limit = self.collate_kwargs["allowed_max_length"]
        useless, cut, same, same_shown = {}, 0, 0, 0
        for name in SPLITS:
            ds = self.dataset(name)
            over = starts_beyond(ds.scored_from, limit)
            equal = [ds.response_ids["chosen"][i] == ds.response_ids["rejected"][i] for i in range(len(ds))]
            shown = [ds.visible("chosen", i, limit) == ds.visible("rejected", i, limit) for i in range(len(ds))]
            bad = [(o, not o and e, not o and not e and v) for o, e, v in zip(over, equal, shown)]
            cut, same, same_shown = (cut + sum(b[0] for b in bad), same + sum(b[1] for b in bad),
                                     same_shown + sum(b[2] for b in bad))
            useless[name] = sum(any(b) for b in bad)
        reasons, fixes = [], []
        if cut:
            reasons.append(f"{cut} have prompts longer than data.allowed_max_length={limit} tokens "
                           "(model.context_length by default), which cuts both responses away")
        if same:
            reasons.append(f"{same} have identical chosen and rejected responses")
        if same_shown:
            reasons.append(f"{same_shown} have responses that differ only after the first {limit} tokens a batch keeps")
        if cut or same_shown:
            fixes.append("raise data.allowed_max_length (at most model.context_length)"
                         + (" or shorten the prompts" if cut else ""))
        if same:
            fixes.append("give each pair two different responses")
        self.report_unlearnable(useless, "; ".join(reasons), "; ".join(fixes), PreferenceDataError)

    def dataset(self, split: str) -> PreferenceDataset:
        """The ``train`` / ``val`` / ``test`` dataset (after :meth:`setup`)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid choices: {list(SPLITS)}")
        self.setup()
        return {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]

    def fingerprint(self, split: str) -> str:
        """:meth:`PreferenceDataset.fingerprint` of ``split`` combined with the collate settings."""
        settings = json.dumps(self.collate_kwargs, sort_keys=True)
        return hashlib.sha256((self.dataset(split).fingerprint() + settings).encode()).hexdigest()

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, True, partial(preference_collate, **self.collate_kwargs))

    def val_dataloader(self) -> DataLoader:
        return self.ordered_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        collate = InstructionTestCollate(self.test_set, self.max_prompt_length, collate_fn=preference_collate,
                                         **self.collate_kwargs)
        return self._loader(self.test_set, self.val_batch_size, False, collate)

    def ordered_dataloader(self, split: str) -> DataLoader:
        """Every pair of ``split`` in order, no shuffling, no dropped batch (evaluation, and
        precomputing reference log-probabilities)."""
        collate = partial(preference_collate, **self.collate_kwargs)
        return self._loader(self.dataset(split), self.val_batch_size, False, collate)
