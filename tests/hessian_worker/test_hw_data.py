"""Calibration data: files, seeded sampling, batching, splitting."""

from __future__ import annotations

import pytest
import torch

from hessian_worker.data import Calibration, load_calibration
from hessian_worker.errors import DataError


class _Tok:
    """A whitespace tokenizer with the Hugging Face call signature (padding + attention mask)."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = [[len(w) for w in t.split()][:max_length] for t in texts]
        width = max(len(x) for x in ids)
        return {"input_ids": torch.tensor([x + [0] * (width - len(x)) for x in ids]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
                "other": torch.zeros(len(ids))}


def test_text_file_is_tokenized_sampled_and_batched(tmp_path) -> None:
    path = tmp_path / "calib.txt"
    path.write_text("a bb ccc\n\none two\nx\nfour words are here\nlast one\n")
    data = load_calibration(path, tokenizer=_Tok(), samples=4, batch_size=3, seed=0)
    assert data.sizes == [3, 1] and set(data.batches[0]) == {"input_ids", "attention_mask"}
    again = load_calibration(path, tokenizer=_Tok(), samples=4, batch_size=3, seed=0)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(data.batches, again.batches, strict=True))
    other = load_calibration(path, tokenizer=_Tok(), samples=4, batch_size=3, seed=1)
    assert any(not torch.equal(a["input_ids"], b["input_ids"])
               for a, b in zip(data.batches, other.batches, strict=True))
    with pytest.raises(DataError, match="tokenizer"):
        load_calibration(path)


def test_tensor_files_and_seeded_sampling_ignore_global_rng(tmp_path) -> None:
    x = torch.arange(20.0).reshape(10, 2)
    torch.save(x, tmp_path / "x.pt")
    torch.save({"input_ids": torch.arange(10).reshape(10, 1), "attention_mask": torch.ones(10, 1)}, tmp_path / "d.pt")
    torch.manual_seed(0)
    a = load_calibration(tmp_path / "x.pt", samples=6, batch_size=4, seed=3)
    torch.manual_seed(99)
    b = load_calibration(tmp_path / "x.pt", samples=6, batch_size=4, seed=3)
    assert a.sizes == [4, 2] and torch.equal(a.rows()["input"], b.rows()["input"])
    d = load_calibration(tmp_path / "d.pt", batch_size=5)
    assert set(d.batches[0]) == {"input_ids", "attention_mask"} and d.num_samples == 10
    with pytest.raises(DataError, match="does not exist"):
        load_calibration(tmp_path / "missing.pt")
    with pytest.raises(DataError, match="disagree"):
        load_calibration({"a": torch.zeros(3), "b": torch.zeros(4)})


def test_split_pads_token_batches_of_different_width() -> None:
    data = Calibration([
        {"input_ids": torch.tensor([[5, 6, 7], [8, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]])},
        {"input_ids": torch.tensor([[9, 4]]), "attention_mask": torch.tensor([[1, 1]])},
    ])
    fit, held = data.split(1, seed=0)
    assert fit.num_samples == 2 and held.num_samples == 1
    rows = torch.cat([fit.rows()["input_ids"], held.rows()["input_ids"]])
    assert sorted(map(tuple, rows.tolist())) == [(5, 6, 7), (8, 0, 0), (9, 4, 0)]
    with pytest.raises(DataError, match="holdout"):
        data.split(3)
