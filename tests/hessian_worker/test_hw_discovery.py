"""Layer discovery and the name matcher."""

from __future__ import annotations

import pytest
from hw_cases import tiny_bert, tiny_mlp
from torch import nn

from hessian_worker.discovery import Matcher, discover_layers, split_block_name
from hessian_worker.errors import DiscoveryError


def test_matcher_full_name_prefix_and_regex() -> None:
    m = Matcher(["encoder.layer.0", "re:.*\\.query\\.weight", "pooler.dense.weight"])
    assert m.matches("encoder.layer.0.output.dense.weight")
    assert not m.matches("encoder.layer.01.output.dense.weight")  # prefix only at a dot
    assert not m.matches("encoder.layer.10.output.dense.weight")
    assert m.matches("encoder.layer.5.attention.self.query.weight")
    assert not m.matches("encoder.layer.5.attention.self.query.bias")  # regex must match whole name
    assert m.matches("pooler.dense.weight")
    assert not m.matches("pooler.dense.bias")
    assert not Matcher([])
    assert Matcher(["re:x.*", "nothing"]).unused(["xa", "b"]) == ["nothing"]


def test_matcher_rejects_bad_regex() -> None:
    with pytest.raises(DiscoveryError, match="bad regex"):
        Matcher(["re:("])


def test_split_block_name() -> None:
    assert split_block_name("encoder.layer.3.attention.self.query.weight") == (
        "encoder.layer", 3, "attention.self.query.weight")
    assert split_block_name("h.11.mlp.c_fc.weight") == ("h", 11, "mlp.c_fc.weight")
    assert split_block_name("0.fc.weight") == ("", 0, "fc.weight")
    assert split_block_name("encoder.block.2.layer.1.wi.weight") == ("encoder.block", 2, "layer.1.wi.weight")
    assert split_block_name("pooler.dense.weight") is None


def test_bert_families() -> None:
    layers = discover_layers(tiny_bert())
    fams = {x.family for x in layers}
    assert fams == {"attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight",
                    "attention.output.dense.weight", "intermediate.dense.weight", "output.dense.weight"}
    q = [x for x in layers if x.family == "attention.self.query.weight"]
    assert [(x.name, x.index, x.params) for x in q] == [
        ("encoder.layer.0.attention.self.query.weight", 0, 64),
        ("encoder.layer.1.attention.self.query.weight", 1, 64),
    ]
    # embeddings, pooler, biases and LayerNorms are not shared by default
    assert all(x.name.startswith("encoder.layer.") and x.name.endswith(".weight") for x in layers)
    assert not any("LayerNorm" in x.name for x in layers)


def test_gpt2_and_llama_families() -> None:
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    gpt2 = GPT2Model(GPT2Config(n_embd=8, n_layer=3, n_head=2, vocab_size=20, n_positions=16))
    layers = discover_layers(gpt2)
    assert {x.family for x in layers} == {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                                          "mlp.c_proj.weight"}
    assert [x.index for x in layers if x.family == "mlp.c_fc.weight"] == [0, 1, 2]
    llama = LlamaModel(LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=20, bos_token_id=0, eos_token_id=1))
    layers = discover_layers(llama)
    assert {x.family for x in layers} == {f"self_attn.{p}_proj.weight" for p in "qkvo"} | {
        f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert len(layers) == 14


def test_plain_module_and_sequential() -> None:
    layers = discover_layers(tiny_mlp())
    assert [(x.name, x.family, x.index) for x in layers] == [
        (f"blocks.{i}.fc.weight", "fc.weight", i) for i in range(3)]
    seq = nn.Sequential(*(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)))
    assert [x.name for x in discover_layers(seq)] == ["0.0.weight", "1.0.weight", "2.0.weight"]


class _EncDec(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(nn.Linear(4, 4) for _ in range(2))})
        self.decoder = nn.ModuleDict({"layers": nn.ModuleList(nn.Linear(4, 4) for _ in range(2))})
        self.mixed = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(3, 4), nn.Linear(3, 4)])


def test_ambiguous_roles_get_container_and_shape() -> None:
    fams = {x.family for x in discover_layers(_EncDec())}
    assert fams == {"encoder.layers.weight", "decoder.layers.weight", "mixed.weight[4x4]", "mixed.weight[4x3]"}


def test_overrides_targets_ignore_families() -> None:
    model = tiny_bert()
    layers = discover_layers(model, targets=["re:.*attention\\.self\\.(query|key)\\.(weight|bias)"],
                             ignore=["encoder.layer.1.attention.self.key.bias"])
    names = {x.name for x in layers}
    assert "encoder.layer.0.attention.self.query.bias" in names  # explicit targets may pick any rank
    assert "encoder.layer.0.attention.self.key.bias" not in names  # its partner was ignored: family of 1
    assert {x.family for x in layers} == {"attention.self.query.weight", "attention.self.key.weight",
                                          "attention.self.query.bias"}
    custom = discover_layers(model,
                             families={"re:.*\\.(query|key)\\.weight": "qk"})
    qk = [x for x in custom if x.family == "qk"]
    assert len(qk) == 4 and {x.index for x in qk} == {0, 1}
    assert "attention.self.query.weight" not in {x.family for x in custom}


def test_errors_name_the_fix() -> None:
    with pytest.raises(DiscoveryError, match="match no parameter"):
        discover_layers(tiny_mlp(), targets=["blocks.0.nope"])
    with pytest.raises(DiscoveryError, match="no shareable family"):
        discover_layers(nn.Sequential(nn.Linear(2, 2)))
    with pytest.warns(UserWarning, match="ignore patterns match no parameter"):
        discover_layers(tiny_mlp(), ignore=["lm_head"])
    with pytest.raises(DiscoveryError, match="families pattern"):
        discover_layers(tiny_mlp(), families={"zzz": "f"})
