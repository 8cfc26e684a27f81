"""The compressed model directory (issue 19): a Hugging Face directory that plain transformers
refuses by name instead of loading with weights initialized at random, ``load_compressed`` loads
tied (one storage per class, stored dtypes) and saves back byte for byte, and ``geoshare export``
turns into a standard checkpoint with the same outputs. MiniLM under the tie and basis schemes, a
GPT-2 Conv1D basis, and a tiny LLaMA compressed block by block."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from geoshare.cli import main
from hessian_worker.apply import apply_plan
from hessian_worker.basis.modules import BasisLinear, install_class
from hessian_worker.errors import PlanError
from hessian_worker.export import export_dense
from hessian_worker.io import load_compressed, load_shared, save_compressed, save_shared
from hessian_worker.llm import compress_checkpoint
from hessian_worker.llm.synthetic import (
    SHAPES,
    decoder_config,
    random_tokens,
    write_random_checkpoint,
)
from hessian_worker.model_dir import GUARD
from hessian_worker.models import load_model, minilm_path
from hessian_worker.pipeline import CompressConfig
from hessian_worker.tying import unique_params
from solver.schema import SharingPlan

QUERIES = [f"encoder.layer.{i}.attention.self.query.weight" for i in range(6)]
FFN = [f"encoder.layer.{i}.intermediate.dense.weight" for i in range(6)]
SENTENCES = ["the cat sat on the mat", "a compressed model should say what it is", "hello"]


def plan_of(groups: list[list[str]]) -> SharingPlan:
    return SharingPlan(status="feasible", coloring={n: c for c, g in enumerate(groups) for n in g}, groups=groups,
                       solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0})


def install_bases(model: torch.nn.Module, names: list[str], rank: int) -> None:
    """One basis for ``names``: the top-``rank`` left singular vectors of the stacked weights, each
    layer's coefficients its projection (a basis-scheme layout without running the analysis)."""
    weights = [model.get_parameter(n).detach() for n in names]
    u = torch.linalg.svd(torch.cat(weights, dim=1), full_matrices=False)[0][:, :rank]
    install_class(model, names, u, [u.T @ w for w in weights], side="out")


def storages(model: torch.nn.Module) -> int:
    """Parameters counted once per storage: what the model really holds."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[p.untyped_storage().data_ptr()] = p.numel()
    return sum(seen.values())


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(load, folder: Path) -> None:
    """Plain transformers refuses the directory, naming the project's loader, before building anything."""
    with pytest.raises(ValueError, match=r"hessian_worker\.load_compressed"):
        load(folder)


@pytest.fixture(scope="module")
def minilm_batch() -> dict[str, torch.Tensor]:
    return load_model("minilm").tokenizer(SENTENCES, padding=True, return_tensors="pt")


def _minilm(scheme: str):
    loaded = load_model("minilm")
    model = loaded.model
    if scheme == "tie":
        plan = plan_of([QUERIES[:3], QUERIES[3:], FFN[:2]])
        apply_plan(model, plan, "mean")
    else:  # two shared bases (layers 0-2, 3-5) and tied queries: the mixed layout
        plan = plan_of([FFN[:3], FFN[3:], QUERIES[:2]])
        apply_plan(model, plan_of([QUERIES[:2]]), "mean")
        install_bases(model, FFN[:3], 48)
        install_bases(model, FFN[3:], 48)
    return model, plan


@pytest.mark.parametrize("scheme", ["tie", "basis"])
def test_minilm_out_is_a_model_directory_that_loads_tied_and_exports_dense(tmp_path, minilm_batch, scheme):
    from transformers import AutoConfig, AutoModel, AutoTokenizer, BertModel, pipeline

    model, plan = _minilm(scheme)
    with torch.no_grad():
        expected = model(**minilm_batch).last_hidden_state
    out = tmp_path / "out"
    save_shared(model, plan, out, source="minilm")

    # a Hugging Face directory: the source's config, tokenizer and sentence-transformers files
    src = minilm_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "modules.json", "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    config = json.loads((out / "config.json").read_text())
    assert config["transformers_weights"] == GUARD
    assert {k: v for k, v in config.items() if k != "transformers_weights"} == json.loads((src / "config.json").read_text())
    meta = json.loads((out / "plan.json").read_text())
    assert meta["format"] == "geoshare/1" and meta["scheme"] == scheme and meta["model_class"] == "BertModel"
    assert meta["source"]["model"] == "minilm"
    assert meta["source"]["sha256"] == {"model.safetensors": hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()}
    assert [c["members"] for c in meta["classes"]] == plan.groups
    if scheme == "tie":
        assert meta["layers"][QUERIES[4]] == {"class": 1, "reads": QUERIES[3]}
    else:
        first = "encoder.layer.3.intermediate.dense"
        assert meta["layers"][FFN[5]] == {"class": 1, "reads": f"{first}.basis",
                                          "coef": "encoder.layer.5.intermediate.dense.coef"}
        assert meta["layers"][QUERIES[1]] == {"class": 2, "reads": QUERIES[0]}

    # plain transformers: config and tokenizer load; every model class refuses, naming the loader
    assert AutoConfig.from_pretrained(out).hidden_size == 384 and AutoTokenizer.from_pretrained(out)("hi")["input_ids"]
    refused(AutoModel.from_pretrained, out)
    refused(BertModel.from_pretrained, out)
    refused(lambda f: pipeline("feature-extraction", model=str(f)), out)

    # the documented loader: tied, one storage per class, float32 as saved, the saved model's outputs
    loaded = load_compressed(out, attn_implementation="eager")
    assert storages(loaded) == unique_params(loaded) == unique_params(model) == meta["unique_params"]
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert not hasattr(loaded.config, "transformers_weights")
    layers = loaded.encoder.layer
    if scheme == "tie":
        assert layers[0].attention.self.query.weight is layers[2].attention.self.query.weight
        assert layers[0].attention.self.query.weight is not layers[3].attention.self.query.weight
    else:
        assert isinstance(layers[1].intermediate.dense, BasisLinear)
        assert layers[0].intermediate.dense.basis is layers[2].intermediate.dense.basis
        assert layers[0].intermediate.dense.basis is not layers[3].intermediate.dense.basis
    by_hand = load_model("minilm").model
    load_shared(by_hand, out)
    with torch.no_grad():
        torch.testing.assert_close(by_hand(**minilm_batch).last_hidden_state, expected, rtol=0, atol=0)
        torch.testing.assert_close(loaded(**minilm_batch).last_hidden_state, expected, rtol=0, atol=0)
    assert load_model(str(out)).tokenizer is not None  # a compressed directory is a model spec too

    # saved again, byte for byte (save_pretrained of the loaded model is save_compressed)
    loaded.save_pretrained(tmp_path / "again")
    assert files(tmp_path / "again") == files(out)
    with pytest.raises(TypeError, match="save_compressed"):
        loaded.save_pretrained(tmp_path / "x", safe_serialization=True)

    # the dense export: plain transformers loads every tensor and computes the same
    assert main(["export", str(out), "--format", "hf", "-o", str(tmp_path / "dense")]) == 0
    dense, info = AutoModel.from_pretrained(tmp_path / "dense", attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert "transformers_weights" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    with safe_open(str(tmp_path / "dense" / "model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt" and not any(k.endswith((".basis", ".coef")) for k in f.keys())  # noqa: SIM118
    with torch.no_grad():
        got = dense(**minilm_batch).last_hidden_state
    # the tie scheme's tensors are copied; a basis weight is B·C in one product instead of two
    atol = 0 if scheme == "tie" else 1e-5 * float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


def test_gpt2_conv1d_bases_export_transposed_back(tmp_path):
    from transformers import AutoModel, GPT2Config, GPT2Model

    from hessian_worker.curvature.layerwise import linear_modules

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=50, n_positions=32)).double().eval()
    names = [f"h.{i}.mlp.c_fc.weight" for i in range(3)]
    layers = linear_modules(model, names)
    weights = [layers[n][0].weight.detach().T for n in names]  # [out, in]
    u = torch.linalg.svd(torch.cat(weights, dim=1), full_matrices=False)[0][:, :6]
    install_class(model, names, u, [u.T @ w for w in weights], side="out")
    plan = plan_of([names])
    save_shared(model, plan, tmp_path / "out")
    ids = random_tokens(50, 2, 9, seed=3)
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    refused(AutoModel.from_pretrained, tmp_path / "out")  # a model built in memory gets its own config.json
    export_dense(tmp_path / "out", tmp_path / "dense")
    dense, info = AutoModel.from_pretrained(tmp_path / "dense", output_loading_info=True)
    assert not info["missing_keys"] and dense.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).last_hidden_state, expected, rtol=1e-12, atol=1e-12)


def _llama(folder: Path, *, tie_embeddings: bool) -> Path:
    from transformers import GenerationConfig

    config = decoder_config("llama", **SHAPES["tiny"], tie_word_embeddings=tie_embeddings)
    write_random_checkpoint(config, folder, dtype=torch.bfloat16, shard_bytes=40_000, std=0.2)
    GenerationConfig(max_new_tokens=7, do_sample=False).save_pretrained(folder)
    torch.save(random_tokens(SHAPES["tiny"]["vocab_size"], 16, 12, seed=1), folder / "calib.pt")
    return folder


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_streamed_llama_out_refuses_plain_transformers_and_exports_dense(tmp_path, tie_embeddings):
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    source = _llama(tmp_path / "src", tie_embeddings=tie_embeddings)
    config = CompressConfig(ratio=0.7, backend="kfac", merge="layerwise", batch_size=4, progress=False, device="cpu",
                            top=2, normalized_top=1, per_pattern=1)
    out = tmp_path / "out"
    report = compress_checkpoint(source, source / "calib.pt", config, out)
    assert any(len(g) > 1 for g in report.plan.groups)
    assert (out / "generation_config.json").read_bytes() == (source / "generation_config.json").read_bytes()
    meta = json.loads((out / "plan.json").read_text())
    assert meta["model_class"] == "LlamaForCausalLM" and meta["source"]["model"] == str(source)
    assert set(meta["source"]["sha256"]) == {p.name for p in source.glob("model*")}
    refused(AutoModelForCausalLM.from_pretrained, out)
    refused(LlamaForCausalLM.from_pretrained, out)

    # load_compressed: what load_shared gives a model built by hand, in the stored bfloat16, tied
    loaded = load_compressed(out, attn_implementation="eager")
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), attn_implementation="eager",
                                             dtype=torch.bfloat16)
    load_shared(fresh, out)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert storages(loaded) == meta["unique_params"] == report.unique_params
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tie_embeddings
    assert loaded.generation_config.max_new_tokens == 7  # the copied generation config
    ids = random_tokens(SHAPES["tiny"]["vocab_size"], 3, 10, seed=7)
    with torch.no_grad():
        expected = fresh(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)
    save_compressed(loaded, tmp_path / "again")
    assert files(tmp_path / "again") == {k: v for k, v in files(out).items() if k not in ("report.json", "problem.json")}

    # dense, in shards: plain transformers loads it complete and computes the same logits
    export_dense(out, tmp_path / "dense", shard_bytes=20_000)
    assert len(list((tmp_path / "dense").glob("model-*-of-*.safetensors"))) > 1
    dense, info = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", attn_implementation="eager",
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and dense.dtype == torch.bfloat16
    index = json.loads((tmp_path / "dense" / "model.safetensors.index.json").read_text())
    assert ("lm_head.weight" in index["weight_map"]) is not tie_embeddings  # a declared tie stays single
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, expected, rtol=0, atol=0)


def test_old_directories_still_load_and_refusals_name_the_fix(tmp_path, capsys):
    """A directory written before config.json travelled with it: load_shared reads it as before;
    load_compressed and export say what is missing."""
    from hw_cases import tiny_bert

    bert = tiny_bert()
    queries = [f"encoder.layer.{i}.attention.self.query.weight" for i in range(2)]
    apply_plan(bert, plan_of([queries]), "mean")
    save_shared(bert, plan_of([queries]), tmp_path / "old")
    (tmp_path / "old" / "config.json").unlink()
    fresh = tiny_bert(seed=3)
    load_shared(fresh, tmp_path / "old")
    assert fresh.encoder.layer[0].attention.self.query.weight is fresh.encoder.layer[1].attention.self.query.weight
    with pytest.raises(PlanError, match="no config.json"):
        load_compressed(tmp_path / "old")
    with pytest.raises(PlanError, match="not a compressed model directory"):
        load_compressed(tmp_path)
    with pytest.raises(PlanError, match="load_compressed"):
        save_compressed(bert, tmp_path / "x")  # a model tied in memory is saved with save_shared
    assert main(["export", str(tmp_path / "old"), "-o", str(tmp_path / "dense")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_geoshare_compress_writes_the_source_files_and_the_checksum(tmp_path, capsys):
    """The CLI's in-memory path: a Hugging Face directory in, its config and checksum in out/."""
    from hw_cases import tiny_bert
    from transformers import AutoModel

    source = tmp_path / "bert"
    tiny_bert().save_pretrained(source)
    ids = torch.randint(1, 40, (12, 6), generator=torch.Generator().manual_seed(0))
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "calib.pt")
    out = tmp_path / "out"
    assert main(["compress", "--model", str(source), "--data", str(tmp_path / "calib.pt"), "--ratio", "0.7",
                 "--dtype", "float64", "--device", "cpu", "--quiet", "--top", "2", "--normalized-top", "0",
                 "--per-pattern", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    meta = json.loads((out / "plan.json").read_text())
    digest = hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    assert meta["source"] == {"model": str(source), "sha256": {"model.safetensors": digest}}
    refused(AutoModel.from_pretrained, out)
    loaded = load_compressed(out)
    assert storages(loaded) == meta["unique_params"] and loaded.dtype == torch.float64
