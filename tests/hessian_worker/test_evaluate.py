"""``geoshare evaluate`` (issue 19): every figure against a hand computation on small models.

Perplexity and KL of a tiny GPT-2 LM (tie and basis schemes, padded samples), embedding cosine of
MiniLM (tie and basis, against the bench's own embedding code), the bench's byte-level GPT as a
``module:factory`` model (perplexity against the bench's ``perplexity``, distillation loss, a task
loss over the CLI), parameters counted from storage against the plan's count, weight bytes on disk,
and the peak memory of loading + one forward in a fresh process (a compressed model below its
dense source by about the bytes sharing removed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from geoshare.cli import main
from hessian_worker.apply import apply_plan
from hessian_worker.basis.modules import install_class
from hessian_worker.evaluation import EvaluateConfig, Metric, evaluate
from hessian_worker.io import load_compressed, load_shared, save_shared
from hessian_worker.models import load_model
from solver.schema import PlanParams, SharingPlan

SENTENCES = ["the cat sat on the mat", "a compressed model should say what it is", "hello",
             "layers that share one tensor are stored once", "measure it on your own sentences"]


def plan_of(groups: list[list[str]], params: dict[str, torch.Tensor] | None = None,
            kept: int | None = None) -> SharingPlan:
    """A plan of ``groups``; with ``params``, its counts (original: every listed layer; shared: the
    plan's own count ``kept``, or each class's first member)."""
    counts = None
    if params is not None:
        original = sum(params[n].numel() for g in groups for n in g)
        shared = kept if kept is not None else sum(params[g[0]].numel() for g in groups)
        counts = PlanParams(original=original, shared=shared, ratio=shared / original)
    return SharingPlan(status="feasible", coloring={n: c for c, g in enumerate(groups) for n in g}, groups=groups,
                       params=counts, solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0})


def storages(model: torch.nn.Module) -> int:
    seen = {p.untyped_storage().data_ptr(): p.numel() for p in model.parameters()}
    return sum(seen.values())


# --- a causal LM: perplexity and KL ------------------------------------------------------------


def _gpt2(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=4, n_head=2, vocab_size=50, n_positions=32)).double().save_pretrained(folder)
    return folder


def _padded_tokens(path: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (7, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[4, 3:] = 0
    mask[6, 1:] = 0  # one real token: nothing to predict
    torch.save({"input_ids": ids, "attention_mask": mask}, path)
    return path


def _hand_perplexity(model: torch.nn.Module, reference: torch.nn.Module, data: dict) -> tuple[float, float, float, int]:
    """Token by token: exp(mean NLL) of both models and the mean KL(reference || model) over every
    real token whose previous token is real."""
    nll_m = nll_r = kl = 0.0
    count = 0
    with torch.no_grad():
        lm = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits.double()
        lr = reference(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits.double()
    for i in range(data["input_ids"].shape[0]):
        for t in range(1, data["input_ids"].shape[1]):
            if not (data["attention_mask"][i, t] and data["attention_mask"][i, t - 1]):
                continue
            pm, pr = F.log_softmax(lm[i, t - 1], -1), F.log_softmax(lr[i, t - 1], -1)
            target = int(data["input_ids"][i, t])
            nll_m -= float(pm[target])
            nll_r -= float(pr[target])
            kl += float((pr.exp() * (pr - pm)).sum())
            count += 1
    return math.exp(nll_m / count), math.exp(nll_r / count), kl / count, count


@pytest.mark.parametrize("scheme", ["tie", "basis"])
def test_perplexity_kl_and_counts_equal_a_hand_computation(tmp_path, scheme):
    from transformers import AutoModelForCausalLM

    source = _gpt2(tmp_path / "src")
    data = _padded_tokens(tmp_path / "eval.pt")
    model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager")
    params = dict(model.named_parameters(remove_duplicate=False))
    fc = [f"transformer.h.{i}.mlp.c_fc.weight" for i in range(4)]
    attn = [f"transformer.h.{i}.attn.c_attn.weight" for i in range(4)]
    if scheme == "tie":
        plan = plan_of([fc[:2], [fc[2]], [fc[3]], [attn[0]], [attn[1]], attn[2:]], params)
        apply_plan(model, plan, "mean")
        removed = params[fc[0]].numel() + params[attn[0]].numel()
    else:  # one rank-4 basis for the four c_fc layers (GPT-2 Conv1D, stored [in, out])
        from hessian_worker.curvature.layerwise import linear_modules

        layers = linear_modules(model, fc)
        weights = [layers[n][0].weight.detach().T for n in fc]  # [out, in]
        u = torch.linalg.svd(torch.cat(weights, dim=1), full_matrices=False)[0][:, :4]
        kept = u.numel() + sum((u.T @ w).numel() for w in weights)
        plan = plan_of([fc], params, kept=kept)
        install_class(model, fc, u, [u.T @ w for w in weights], side="out")
        removed = 4 * params[fc[0]].numel() - kept
    out = tmp_path / "out"
    save_shared(model, plan, out, source=str(source))

    report = evaluate(str(out), str(source), str(data), EvaluateConfig(batch_size=3, memory=False))

    assert report.metric is Metric.perplexity  # a *LMHeadModel: auto is perplexity
    loaded = load_compressed(out, attn_implementation="eager")
    reference = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager")
    ppl_m, ppl_r, kl, count = _hand_perplexity(loaded, reference, torch.load(data))
    assert report.tokens == count == 6 * 9 - 4 - 7
    assert report.model.score == pytest.approx(ppl_m, rel=1e-9)
    assert report.reference.score == pytest.approx(ppl_r, rel=1e-9)
    assert report.quality["kl"] == pytest.approx(kl, rel=1e-7, abs=1e-12) and kl > 0
    assert report.quality["perplexity_ratio"] == pytest.approx(ppl_m / ppl_r, rel=1e-9)

    # parameters from storage: the loaded model's memory, the saved count and the plan's all agree
    meta = json.loads((out / "plan.json").read_text())
    assert report.model.storage.unique_params == storages(loaded) == meta["unique_params"]
    assert report.reference.storage.unique_params == storages(reference)
    assert report.reference.storage.unique_params - report.model.storage.unique_params == removed
    assert removed == plan.params.original - plan.params.shared
    assert report.model.storage.named_params > report.model.storage.unique_params
    assert report.model.storage.param_bytes == 8 * report.model.storage.unique_params  # float64 as saved
    assert report.model.disk_bytes == (out / "model.safetensors").stat().st_size
    assert report.reference.disk_bytes == (source / "model.safetensors").stat().st_size
    assert report.model.memory is None


# --- an encoder: embedding cosine --------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["tie", "basis"])
def test_minilm_embedding_cosine_equals_the_bench_measure(tmp_path, scheme):
    from bench.tasks.minilm import embed

    queries = [f"encoder.layer.{i}.attention.self.query.weight" for i in range(6)]
    ffn = [f"encoder.layer.{i}.intermediate.dense.weight" for i in range(6)]
    loaded = load_model("minilm")
    model = loaded.model
    if scheme == "tie":
        plan = plan_of([queries[:3], queries[3:], ffn[:2]])
        apply_plan(model, plan, "mean")
    else:
        plan = plan_of([ffn])
        weights = [model.get_parameter(n).detach() for n in ffn]
        u = torch.linalg.svd(torch.cat(weights, dim=1), full_matrices=False)[0][:, :48]
        install_class(model, ffn, u, [u.T @ w for w in weights], side="out")
    out = tmp_path / "out"
    save_shared(model, plan, out, source="minilm")
    (tmp_path / "eval.txt").write_text("\n".join(SENTENCES) + "\n")

    report = evaluate(str(out), "minilm", str(tmp_path / "eval.txt"), EvaluateConfig(batch_size=2, memory=False))

    assert report.metric is Metric.cosine and report.samples == len(SENTENCES) and report.tokens is None
    reference = load_model("minilm").model
    cos = (embed(load_compressed(out), loaded.tokenizer, SENTENCES) * embed(reference, loaded.tokenizer, SENTENCES)).sum(-1)
    assert report.model.score == pytest.approx(float(cos.mean()), abs=2e-6)
    assert report.quality["min_cosine"] == pytest.approx(float(cos.min()), abs=2e-6)
    assert report.reference.score == 1.0 and 0.0 < report.model.score < 0.999
    meta = json.loads((out / "plan.json").read_text())
    assert report.model.storage.unique_params == meta["unique_params"] == storages(load_compressed(out))
    assert report.reference.storage.unique_params == storages(reference) == 22_713_216


# --- the bench's GPT as a module:factory -------------------------------------------------------


def _bench_gpt_out(tmp_path: Path) -> tuple[Path, Path]:
    from eval_cases import tiny_gpt

    model = tiny_gpt()
    names = dict(model.named_parameters())
    plan = plan_of([[f"blocks.{i}.mlp.fc_in.weight" for i in (0, 1)], [f"blocks.{i}.attn.qkv.weight" for i in (2, 3)]],
                   names)
    apply_plan(model, plan, "mean")
    save_shared(model, plan, tmp_path / "out", source="eval_cases:tiny_gpt")
    torch.save(torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(2)), tmp_path / "ids.pt")
    return tmp_path / "out", tmp_path / "ids.pt"


def test_bench_gpt_perplexity_and_distillation_equal_the_bench_and_a_hand_mse(tmp_path):
    from eval_cases import tiny_gpt

    from bench.tasks.gpt import perplexity

    out, data = _bench_gpt_out(tmp_path)
    ids = torch.load(data)
    shared, dense = tiny_gpt(), tiny_gpt()
    load_shared(shared, out)  # a directory without config.json: built by the factory its plan.json names

    report = evaluate(str(out), "eval_cases:tiny_gpt", str(data), EvaluateConfig(metric="perplexity", memory=False))
    assert report.model.score == pytest.approx(perplexity(shared, ids), rel=1e-12)
    assert report.reference.score == pytest.approx(perplexity(dense, ids), rel=1e-12)
    assert report.tokens == 6 * 15
    assert report.model.disk_bytes == (out / "model.safetensors").stat().st_size and report.reference.disk_bytes is None
    # one fc_in [128, 32] and one qkv [96, 32] fewer
    assert report.reference.storage.unique_params - report.model.storage.unique_params == 128 * 32 + 96 * 32

    auto = evaluate(str(out), "eval_cases:tiny_gpt", str(data), EvaluateConfig(memory=False))
    assert auto.metric is Metric.distill  # a bare logits tensor: the distillation loss (mse) to the source
    with torch.no_grad():
        assert auto.quality["loss"] == pytest.approx(float((shared(ids) - dense(ids)).pow(2).mean()), rel=1e-9)


def test_cli_task_loss_reference_from_the_manifest_and_json(tmp_path, capsys):
    out, data = _bench_gpt_out(tmp_path)
    ppl = evaluate(str(out), "eval_cases:tiny_gpt", str(data), EvaluateConfig(metric="perplexity", memory=False))

    assert main(["evaluate", "--model", str(out), "--data", str(data), "--task-loss", "eval_cases:next_byte_loss",
                 "--no-memory", "-o", str(tmp_path / "report.json")]) == 0
    table = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metric"] == "task" and report["reference"]["spec"] == "eval_cases:tiny_gpt"  # from plan.json
    # the mean next-byte cross-entropy over equal-length rows is log perplexity
    assert report["model"]["score"] == pytest.approx(math.log(ppl.model.score), rel=1e-12)
    assert report["quality"]["loss_change"] == pytest.approx(math.log(ppl.model.score / ppl.reference.score), rel=1e-9)
    assert "task loss" in table and f"{report['model']['storage']['unique_params']:,}" in table

    assert main(["evaluate", "--model", "eval_cases:tiny_gpt", "--data", str(data), "--no-memory"]) == 2
    assert "--reference" in capsys.readouterr().err  # nothing recorded to compare with
    assert main(["evaluate", "--model", str(out), "--data", str(data), "--metric", "task", "--no-memory"]) == 2
    assert "--task-loss" in capsys.readouterr().err


# --- peak memory in a fresh process ------------------------------------------------------------


def test_peak_memory_of_load_and_forward_drops_by_what_sharing_removed(tmp_path, capsys):
    """8 BERT layers of width 256, each family tied into one class: 22 MB fewer float32 weights,
    which the compressed model's fresh-process peak must show (at least half of it: allocator and
    page noise is about 1 MB)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, intermediate_size=1024,
                        vocab_size=100, max_position_embeddings=32)
    model = BertModel(config).float().eval()
    model.save_pretrained(tmp_path / "src")
    params = dict(model.named_parameters())
    families = ["attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight",
                "attention.output.dense.weight", "intermediate.dense.weight", "output.dense.weight"]
    plan = plan_of([[f"encoder.layer.{i}.{f}" for i in range(8)] for f in families], params)
    apply_plan(model, plan, "mean")
    save_shared(model, plan, tmp_path / "out", source=str(tmp_path / "src"))
    ids = torch.randint(1, 100, (4, 24), generator=torch.Generator().manual_seed(0))
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "ids.pt")

    assert main(["evaluate", "--model", str(tmp_path / "out"), "--data", str(tmp_path / "ids.pt"), "--card",
                 "-o", str(tmp_path / "report.json")]) == 0
    assert "peak load+forward" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    removed = 4 * (plan.params.original - plan.params.shared)
    mine, ref = report["model"]["memory"], report["reference"]["memory"]
    for memory in (mine, ref):
        assert memory["baseline_reset"] and memory["peak_bytes"] >= memory["after_bytes"] > memory["baseline_bytes"]
        # measured from a cold page cache: the models this process loaded for the quality figures
        # (a compressed one is a reference cycle) no longer map the files
        assert memory["cold_cache"]
    assert removed > 20e6
    assert ref["load_forward_bytes"] - mine["load_forward_bytes"] > removed / 2, (mine, ref)
    assert report["reference"]["disk_bytes"] - report["model"]["disk_bytes"] == pytest.approx(removed, rel=0.01)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Evaluation" in card and "peak memory, load + one forward" in card


def test_peak_of_a_factory_directory_in_a_fresh_process(tmp_path):
    """A compressed directory without config.json is built in the child by the factory its
    plan.json names (importable there through the parent's sys.path), from a cold page cache."""
    from hessian_worker.footprint import measure_peak

    out, data = _bench_gpt_out(tmp_path)
    peak = measure_peak(str(out), {"input": torch.load(data)})
    assert peak.cold_cache and peak.baseline_reset and peak.peak_bytes >= peak.baseline_bytes
    assert peak.load_s > 0 and peak.forward_s > 0
    with pytest.raises(RuntimeError, match="no_such_module"):
        measure_peak("no_such_module:factory", {"input": torch.load(data)})
