"""Cost matrices, analyze() and plan re-scoring against dense quadratic forms."""

from __future__ import annotations

import warnings

import pytest
import torch
from hw_cases import bert_data, dense_ggn, dense_hessian, mlp_data, quad_dense, tiny_bert, tiny_mlp

from hessian_worker import AnalyzeConfig, analyze, predict_plan_loss
from hessian_worker.costs import cost_matrix
from hessian_worker.curvature.base import CurvatureKind
from hessian_worker.curvature.exact import ExactCurvature
from hessian_worker.curvature.projected import ProjectedCurvature, check_memory
from hessian_worker.discovery import discover_layers
from hessian_worker.errors import MemoryBudgetError
from hessian_worker.objective import Objective
from hessian_worker.pair_costs import make_predict
from solver.schema import CostKind, SharingProblem

CPU64 = {"dtype": "float64", "device": "cpu", "progress": False}


def _dense_pair_costs(obj: Objective, kind: CostKind) -> torch.Tensor:
    """½ δᵀGδ for every pair from the dense GGN, δ built by hand."""
    g = dense_ggn(obj)
    names = obj.names
    n = len(names)
    out = torch.zeros(n, n)
    for a in range(n):
        for b in range(n):
            if a == b:
                continue
            diff = obj.params0[names[b]] - obj.params0[names[a]]
            if kind is CostKind.pairwise:
                delta = {names[a]: (diff / 2)[None], names[b]: (-diff / 2)[None]}
            else:
                delta = {names[a]: diff[None]}
            out[a, b] = 0.5 * quad_dense(g, obj, delta)[0]
    return out


@pytest.mark.parametrize("kind", [CostKind.pairwise, CostKind.assignment])
def test_exact_pair_costs_match_dense(mlp_obj: Objective, kind: CostKind) -> None:
    problem = analyze(tiny_mlp(), mlp_data(), AnalyzeConfig(kind=kind, chunk=2, **CPU64))
    assert isinstance(problem, SharingProblem)
    assert [x.name for x in problem.layers] == mlp_obj.names
    got = torch.tensor(problem.costs.matrix)
    expected = _dense_pair_costs(mlp_obj, kind)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-14)
    assert float(got.max()) > 0
    if kind is CostKind.pairwise:
        assert torch.equal(got, got.T)
        # the cross block H_lm matters: dropping it changes the numbers
        g = dense_ggn(mlp_obj)
        block = g.clone()
        size = 16
        for a in range(3):
            for b in range(3):
                if a != b:
                    block[a * size:(a + 1) * size, b * size:(b + 1) * size] = 0
        w0, w1 = (mlp_obj.params0[mlp_obj.names[i]] for i in (0, 1))
        d = {mlp_obj.names[0]: ((w1 - w0) / 2)[None], mlp_obj.names[1]: ((w0 - w1) / 2)[None]}
        no_cross = 0.5 * float(quad_dense(block, mlp_obj, d)[0])
        assert abs(no_cross - float(got[0, 1])) > 1e-3 * float(got[0, 1])
    else:
        assert not torch.allclose(got, got.T)


def test_bert_matrix_has_null_across_families() -> None:
    cfg = AnalyzeConfig(targets=["re:.*self\\.(query|key)\\.weight"], **CPU64)
    problem = analyze(tiny_bert(), bert_data(), cfg)
    fams = [x.family for x in problem.layers]
    m = problem.costs.matrix
    for i in range(len(fams)):
        assert m[i][i] == 0.0
        for j in range(len(fams)):
            if i != j:
                assert (m[i][j] is None) == (fams[i] != fams[j])
                if m[i][j] is not None:
                    assert m[i][j] > 0


def test_constraints_and_options_from_config() -> None:
    problem = analyze(tiny_mlp(), mlp_data(), AnalyzeConfig(max_params_ratio=0.5, seed=3, **CPU64))
    assert problem.constraints.max_params_ratio == 0.5
    assert problem.options.seed == 3
    assert SharingProblem.model_validate_json(problem.model_dump_json()) == problem
    # the problem names the cost model that made it
    assert problem.source is not None
    assert (problem.source["backend"], problem.source["curvature"], problem.source["loss"]) == ("exact", "ggn", "distill")
    assert problem.source["seed"] == 3 and problem.source["scheme"] == "tie"


def test_config_forbids_unknown_fields() -> None:
    with pytest.raises(ValueError, match="extra"):
        AnalyzeConfig(backnd="exact")
    with pytest.raises(ValueError, match="lanczos_iters"):
        AnalyzeConfig(rank=8, lanczos_iters=4)


@pytest.mark.parametrize("backend", ["projected", "diagonal", "layerwise"])
def test_other_backends_give_valid_problems(backend: str) -> None:
    cfg = AnalyzeConfig(backend=backend, rank=4, probes=16, **CPU64)
    problem = analyze(tiny_mlp(), mlp_data(), cfg)
    values = [v for row in problem.costs.matrix for v in row if v is not None]
    assert min(values) >= 0 and max(values) > 0
    assert problem.source is not None and problem.source["backend"] == backend


def test_projected_full_rank_costs_equal_exact() -> None:
    exact = analyze(tiny_mlp(), mlp_data(), AnalyzeConfig(**CPU64))
    proj = analyze(tiny_mlp(), mlp_data(), AnalyzeConfig(backend="projected", rank=48, **CPU64))
    torch.testing.assert_close(torch.tensor(proj.costs.matrix), torch.tensor(exact.costs.matrix),
                               rtol=1e-6, atol=1e-12)


def test_projected_memory_refusal_names_alternative(mlp_obj: Objective) -> None:
    with pytest.raises(MemoryBudgetError, match="diagonal") as info:
        ProjectedCurvature(mlp_obj, rank=8, generator=torch.Generator(), memory_limit_gb=1e-9)
    assert info.value.needed_bytes > info.value.limit_bytes
    assert check_memory(10, 2, 4, 8, 1.0) == (4 + 2 + 4) * 10 * 8
    with pytest.raises(MemoryBudgetError, match="lower rank to"):
        check_memory(10_000_000, 64, 138, 4, 1.0)
    # Nyström: the rank it names fits once the same oversampling is added back
    with pytest.raises(MemoryBudgetError, match="lower rank to 1,") as nys:
        check_memory(10_000_000, 20, 0, 4, 1.0, sketch=24)
    assert "Nyström sketch of 24 vectors" in str(nys.value)
    assert check_memory(10_000_000, 1, 0, 4, 1.0, sketch=5) <= 1024**3


def test_task_loss_keeps_first_order_term() -> None:
    model = tiny_mlp()
    names = [x.name for x in discover_layers(model)]
    obj = Objective(model, mlp_data(), names, task_loss=lambda y, batch: (y - 0.3).pow(2).mean())
    predict = make_predict(obj, ExactCurvature(obj, CurvatureKind.hessian))
    g = torch.func.grad(obj.loss)(obj.params0)
    deltas = {n: 0.1 * torch.randn(3, *p.shape, generator=torch.Generator().manual_seed(i))
              for i, (n, p) in enumerate(obj.params0.items())}
    lin = sum((deltas[n] * g[n]).reshape(3, -1).sum(1) for n in names)
    assert float(lin.abs().max()) > 1e-4
    expected = lin + 0.5 * quad_dense(dense_hessian(obj), obj, deltas)
    torch.testing.assert_close(predict(deltas), expected, rtol=1e-8, atol=1e-12)


def test_negative_costs_are_clipped_with_warning(mlp_obj: Objective) -> None:
    layers = discover_layers(mlp_obj.model)

    def predict(deltas):
        n = next(iter(deltas.values())).shape[0]
        return -torch.ones(n)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = cost_matrix(layers, mlp_obj.params0, predict, CostKind.pairwise)
    assert m[0][1] == 0.0 and any("clipped" in str(w.message) for w in caught)


@pytest.mark.parametrize("merge", ["mean", "representative"])
def test_predict_plan_loss_is_one_joint_quadratic_form(mlp_obj: Objective, merge: str) -> None:
    names = mlp_obj.names
    groups = [[names[0], names[2], names[1]]]
    got = predict_plan_loss(tiny_mlp(), mlp_data(), groups, AnalyzeConfig(**CPU64), merge=merge)
    ws = [mlp_obj.params0[n] for n in groups[0]]
    target = torch.stack(ws).mean(0) if merge == "mean" else ws[0]
    delta = {n: (target - w)[None] for n, w in zip(groups[0], ws, strict=True)}
    expected = 0.5 * float(quad_dense(dense_ggn(mlp_obj), mlp_obj, delta)[0])
    assert got == pytest.approx(expected, rel=1e-8)
    # pair costs summed over the class differ from the real class cost (the over-count)
    problem = analyze(tiny_mlp(), mlp_data(), AnalyzeConfig(**CPU64))
    m = problem.costs.matrix
    assert sum(m[a][b] for a in range(3) for b in range(a + 1, 3)) != pytest.approx(got, rel=1e-3)


def test_exact_loop_and_vmap_agree(bert_obj: Objective) -> None:
    deltas = {n: 0.1 * torch.randn(3, *p.shape, generator=torch.Generator().manual_seed(1))
              for n, p in bert_obj.params0.items()}
    a = ExactCurvature(bert_obj, chunk=1).quad(deltas)
    b = ExactCurvature(bert_obj, chunk=3).quad(deltas)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


def test_cosine_distillation_costs_match_the_dense_hessian() -> None:
    from hessian_worker.losses import DistillLoss

    model = tiny_mlp()
    names = [x.name for x in discover_layers(model)]
    obj = Objective(model, mlp_data(), names, DistillLoss.cosine)
    h = dense_hessian(obj)  # at the reference the gradient is 0, so the Hessian is the GGN
    torch.testing.assert_close(h, dense_ggn(obj), rtol=1e-7, atol=1e-10)
    problem = analyze(tiny_mlp(), mlp_data(), AnalyzeConfig(distill="cosine", chunk=2, **CPU64))
    got = torch.tensor(problem.costs.matrix)
    for a in range(len(names)):
        for b in range(len(names)):
            if a != b:
                diff = obj.params0[names[b]] - obj.params0[names[a]]
                delta = {names[a]: (diff / 2)[None], names[b]: (-diff / 2)[None]}
                assert float(got[a, b]) == pytest.approx(0.5 * float(quad_dense(h, obj, delta)[0]), rel=1e-7, abs=1e-14)
    assert float(got.max()) > 0
