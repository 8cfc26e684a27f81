"""Model specs: local Hugging Face directory, module:factory, and clear errors."""

from __future__ import annotations

import pytest
import torch
from hw_cases import tiny_bert

from hessian_worker.errors import ModelSpecError
from hessian_worker.models import load_model


def test_local_hf_directory_loads_eager_with_tokenizer(tmp_path) -> None:
    from transformers import BertTokenizerFast

    model = tiny_bert()
    model.save_pretrained(tmp_path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(35)]]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.model.config._attn_implementation == "eager"
    assert not loaded.model.training
    enc = loaded.tokenizer(["w1 w2", "w3"], padding=True, return_tensors="pt")
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    ref = dict(model.named_parameters())
    for name, p in loaded.model.named_parameters():
        torch.testing.assert_close(p.double(), ref[name])


def test_factory_spec_and_errors(tmp_path) -> None:
    loaded = load_model("hw_cases:factory")
    assert loaded.tokenizer is None and type(loaded.model).__name__ == "TinyMLP"
    with pytest.raises(ModelSpecError, match="cannot import"):
        load_model("no_such_module_xyz:factory")
    with pytest.raises(ModelSpecError, match="no callable"):
        load_model("hw_cases:nothing_here")
    with pytest.raises(ModelSpecError, match="not nn.Module"):
        load_model("hw_cases:mlp_data")
    with pytest.raises(ModelSpecError, match="without arguments"):
        load_model("hw_cases:shapes")
    with pytest.raises(ModelSpecError, match="config.json"):
        load_model(str(tmp_path))
