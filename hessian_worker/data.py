"""Calibration data: a list of batches (dicts of tensors) with seeded sampling.

A batch with the single key ``input`` is passed positionally (plain modules); any other batch is
passed as keyword arguments (Hugging Face models: ``input_ids``, ``attention_mask``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hessian_worker.errors import DataError

INPUT_KEY = "input"
# used when a tokenized model gets no --data: enough to exercise the pipeline, not to calibrate well
DEFAULT_SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Stock markets rallied after the central bank held interest rates steady.",
    "She plays the violin in the city orchestra every Sunday.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The new bridge will shorten the commute by twenty minutes.",
    "How do I reset my password if I forgot my email address?",
    "Heavy rain is expected across the northern region tomorrow.",
    "The museum opened an exhibition of early Japanese woodblock prints.",
    "Regular exercise lowers the risk of heart disease.",
    "The committee postponed the vote until next month.",
    "A recursive function calls itself on a smaller input.",
    "Fresh basil and tomatoes make a simple summer pasta.",
    "The spacecraft entered orbit around Jupiter after a five-year journey.",
    "He apologized for arriving late to the meeting.",
    "Volcanic ash grounded flights across the continent for a week.",
    "The library extended its opening hours during exam season.",
]
Batch = dict[str, Tensor]


@dataclass
class Calibration:
    """Calibration batches. Rows are samples; every tensor in a batch shares dim 0."""

    batches: list[Batch]

    def __post_init__(self) -> None:
        if not self.batches:
            raise DataError("calibration data is empty; give at least one sample")

    @property
    def sizes(self) -> list[int]:
        return [batch_size(b) for b in self.batches]

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Calibration:
        """Moves tensors; casts floating ones to ``dtype`` (token ids stay integers)."""

        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        return Calibration([{k: move(v) for k, v in b.items()} for b in self.batches])

    def rows(self) -> Batch:
        """All samples as one batch; token tensors of different padded widths are right-padded
        with zeros (their attention mask is 0 there, so outputs at real tokens do not change)."""
        out = {}
        for key in self.batches[0]:
            parts = [b[key] for b in self.batches]
            width = max(p.shape[1] for p in parts) if parts[0].dim() == 2 else None
            if width is not None and not parts[0].is_floating_point():
                parts = [torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts]
            try:
                out[key] = torch.cat(parts)
            except RuntimeError as exc:
                raise DataError(f"calibration batches cannot be concatenated ({key}): {exc}") from exc
        return out

    def split(self, holdout: int, seed: int = 0, batch_size: int | None = None) -> tuple[Calibration, Calibration]:
        """(fit, held_out): ``holdout`` seeded-random samples go to the second part."""
        rows = self.rows()
        n = batch_size_of(rows)
        if not 0 < holdout < n:
            raise DataError(f"holdout={holdout} must be between 1 and {n - 1} for {n} samples")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        bs = batch_size or max(self.sizes)
        return _batched(rows, perm[holdout:], bs), _batched(rows, perm[:holdout], bs)


def holdout_size(share: float, n: int) -> int:
    """How many of ``n`` samples a held-out ``share`` takes: round(share·n), or 0 when that would
    leave either part empty (then nothing is held out). One rule for every holdout of the worker."""
    held = round(share * n)
    return held if 0 < held < n else 0


def batch_size(batch: Mapping[str, Tensor]) -> int:
    return int(next(iter(batch.values())).shape[0])


batch_size_of = batch_size


def call_model(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> Any:
    """Runs the model on one batch with the calling convention above."""
    if set(batch) == {INPUT_KEY}:
        return model(batch[INPUT_KEY])
    return model(**batch)


def _batched(rows: Batch, order: Tensor, bs: int) -> Calibration:
    return Calibration([{k: v[order[i : i + bs]] for k, v in rows.items()} for i in range(0, len(order), bs)])


def _sample(n: int, samples: int | None, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    return perm if samples is None else perm[: min(samples, n)]


def _tokenize(texts: Sequence[str], tokenizer: Any, max_length: int) -> Batch:
    if tokenizer is None:
        raise DataError("text calibration data needs a tokenizer; this model spec has none (use a tensor file)")
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


DataSource = str | Path | Tensor | Mapping[str, Tensor] | Sequence[str] | Sequence[Batch] | Calibration


def load_calibration(
    source: DataSource,
    *,
    tokenizer: Any | None = None,
    samples: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    max_length: int = 128,
) -> Calibration:
    """Reads calibration data, samples ``samples`` rows with a seeded generator, and batches them.

    Sources: a ``.txt`` file (one sample per line, tokenized with padding and attention mask),
    any other file (``torch.save``'d tensor or dict of tensors), a tensor, a dict of tensors,
    a list of strings, a list of batches, or a Calibration (returned as is).

    Raises:
        DataError: the file is missing, empty, or holds something else.
    """
    if isinstance(source, Calibration):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"calibration file {str(path)!r} does not exist")
        if path.suffix in (".txt", ".text"):
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            source = [ln for ln in lines if ln]
            if not source:
                raise DataError(f"calibration file {str(path)!r} has no non-empty lines")
        else:
            try:
                source = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise DataError(f"cannot read {str(path)!r} as a torch.save'd tensor or dict: {exc}") from exc
    if isinstance(source, Tensor):
        source = {INPUT_KEY: source}
    if isinstance(source, Mapping):
        if not source or not all(isinstance(v, Tensor) for v in source.values()):
            raise DataError("a calibration dict must map names to tensors with one row per sample")
        n = {int(v.shape[0]) for v in source.values()}
        if len(n) != 1:
            raise DataError(f"calibration tensors disagree on the number of samples: {sorted(n)}")
        rows = dict(source)
        order = _sample(n.pop(), samples, seed)
        return _batched(rows, order, batch_size)
    if isinstance(source, Sequence) and source and all(isinstance(s, str) for s in source):
        order = _sample(len(source), samples, seed).tolist()
        texts = [source[i] for i in order]
        return Calibration(
            [_tokenize(texts[i : i + batch_size], tokenizer, max_length) for i in range(0, len(texts), batch_size)]
        )
    if isinstance(source, Sequence) and source and all(isinstance(b, Mapping) for b in source):
        return Calibration([dict(b) for b in source])
    raise DataError(f"cannot use {type(source).__name__} as calibration data (see load_calibration)")
