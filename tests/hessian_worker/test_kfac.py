"""The kfac backend: its statistics against direct references, its output-gradient draws against
the loss Hessian, its low-rank input factor, and its pair route against its dense form."""

from __future__ import annotations

import pytest
import torch
from hw_cases import mlp_data, tiny_mlp
from torch.autograd.functional import hessian

from hessian_worker import AnalyzeConfig, analyze
from hessian_worker.costs import FamilyPairs
from hessian_worker.curvature.kfac import (
    FactorStats,
    OutputFactor,
    collect_factors,
    input_factor,
    output_gradient_sample,
    probe_matrix,
)
from hessian_worker.data import call_model
from hessian_worker.discovery import discover_layers
from hessian_worker.errors import BackendError
from hessian_worker.losses import cosine, kl, mse
from solver.schema import CostKind


def _names(model):
    return [x.name for x in discover_layers(model)]


def _references(model, data, names, loss: str, seed: int = 0):
    """A_l = XᵀX/N from captured inputs and b_l = Σ γ² from autograd on the same draws."""
    modules = dict(model.named_modules())
    inputs = {n: [] for n in names}
    outputs = {}
    handles = []
    for n in names:
        mod = modules[n.removesuffix(".weight")]
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].detach())))
        handles.append(mod.register_forward_hook(lambda m, a, o, n=n: outputs.__setitem__(n, o)))
    gen = torch.Generator().manual_seed(seed)
    b = {n: 0.0 for n in names}
    total = data.num_samples
    for batch in data.batches:
        y = call_model(model, batch)
        g = output_gradient_sample(y, loss, batch["input"].shape[0] / total, None, gen)
        grads = torch.autograd.grad(y, [outputs[n] for n in names], g)
        for n, gamma in zip(names, grads, strict=True):
            b[n] = b[n] + gamma.pow(2).sum(dim=0)
    for h in handles:
        h.remove()
    a = {}
    for n in names:
        x = torch.cat(inputs[n])
        a[n] = x.T @ x / x.shape[0]
    return a, b


def test_factors_match_direct_references():
    model, data = tiny_mlp(), mlp_data()
    names = _names(model)
    curv = collect_factors(model, data, names, loss="mse", rank=None, oversample=0, output=OutputFactor.diagonal,
                           seed=3)
    a, b = _references(model, data, names, "mse", seed=3)
    for n in names:
        f = curv.factors[n]
        rebuilt = f.input.vectors @ torch.diag(f.input.values) @ f.input.vectors.T
        torch.testing.assert_close(rebuilt, a[n], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(f.output, b[n], rtol=1e-10, atol=1e-14)
        assert f.input.bulk == 0.0


def test_full_rank_costs_are_the_kronecker_form():
    """quad_pairs gives tr(B_l D A_l Dᵀ) of every pair, as written out densely."""
    model, data = tiny_mlp(), mlp_data()
    names = _names(model)
    curv = collect_factors(model, data, names, loss="mse", rank=None, oversample=0, output=OutputFactor.diagonal,
                           seed=0)
    a, b = _references(model, data, names, "mse", seed=0)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    pairs = [(0, 1), (0, 2), (1, 2)]
    family = FamilyPairs.of(names, weights, pairs, CostKind.pairwise)
    got = curv.quad_pairs(family)
    for row, (i, j) in enumerate(pairs):
        d = weights[names[j]] - weights[names[i]]
        want = sum(0.25 * torch.trace(torch.diag(b[n]) @ d @ a[n] @ d.T) for n in (names[i], names[j]))
        torch.testing.assert_close(got[row], want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("rank", [1, 2, None])
def test_pair_route_equals_dense_directions(rank):
    model, data = tiny_mlp(), mlp_data()
    names = _names(model)
    curv = collect_factors(model, data, names, loss="mse", rank=rank, oversample=1, output=OutputFactor.diagonal,
                           seed=1)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    for kind in CostKind:
        pairs = [(0, 1), (0, 2), (1, 2)] if kind is CostKind.pairwise else [(0, 1), (1, 0), (2, 0), (1, 2)]
        family = FamilyPairs.of(names, weights, pairs, kind)
        torch.testing.assert_close(curv.quad_pairs(family), curv.quad(family.dense()), rtol=1e-10, atol=1e-14)


def test_sketched_input_factor_is_exact_for_a_low_rank_covariance():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=gen) @ torch.randn(3, 12, generator=gen)  # rank 3 in 12 features
    stats = FactorStats(torch.zeros(12, 6), torch.zeros(()), omega=probe_matrix(12, 6, seed=5))
    stats.add_inputs(x)
    factor = input_factor(stats, rank=3)
    a = x.T @ x / 200
    want = torch.linalg.eigvalsh(a).flip(0)[:3]
    torch.testing.assert_close(factor.values, want, rtol=1e-8, atol=1e-10)
    rebuilt = factor.vectors @ torch.diag(factor.values) @ factor.vectors.T
    torch.testing.assert_close(rebuilt, a, rtol=1e-8, atol=1e-9)
    assert factor.bulk == pytest.approx(0.0, abs=1e-9)


def test_bulk_is_the_mean_of_the_rest_of_the_spectrum():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 8, generator=gen) * torch.linspace(0.2, 3.0, 8)
    stats = FactorStats(torch.zeros(8, 8), torch.zeros(()))
    stats.add_inputs(x)
    factor = input_factor(stats, rank=3)
    spectrum = torch.linalg.eigvalsh(x.T @ x / 300).flip(0)
    assert factor.bulk == pytest.approx(float(spectrum[3:].mean()), rel=1e-10)


@pytest.mark.parametrize("loss", ["kl", "mse", "cosine"])
def test_output_gradient_draws_have_the_loss_hessian_as_covariance(loss):
    """E[g gᵀ] = weight · ∇²ℓ(y) at the reference (the output-side GGN factor), by Monte Carlo."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(2, 3, generator=gen)
    fn = {"kl": kl, "mse": mse, "cosine": cosine}[loss]
    h = hessian(lambda z: fn(z, y, {}), y).reshape(6, 6)
    draws = 40_000
    samples = torch.stack([output_gradient_sample(y, loss, 0.5, None, gen).reshape(-1) for _ in range(draws)])
    empirical = samples.T @ samples / draws
    scale = float(h.abs().max())
    assert float((empirical - 0.5 * h).abs().max()) < 0.04 * scale


def test_analyze_with_kfac_and_its_refusal_of_a_task_loss():
    model, data = tiny_mlp(), mlp_data()
    problem = analyze(model, data, AnalyzeConfig(backend="kfac", progress=False, kfac={"rank": None}))
    costs = [v for row in problem.costs.matrix for v in row if v]
    assert costs and all(v > 0 for v in costs)
    assert problem.source["backend"] == "kfac"
    with pytest.raises(BackendError, match="task loss"):
        analyze(model, data, AnalyzeConfig(backend="kfac", progress=False),
                loss_fn=lambda y, batch: y.pow(2).mean())


def test_reduce_pools_each_sample_before_the_factors():
    """reduce: A from each sample's mean input, b from each sample's summed output gradient."""
    from hessian_worker.curvature.kfac import FactorStats, linear_hooks

    layer = torch.nn.Linear(3, 2)
    x = torch.randn(2, 4, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    stats = {"w": FactorStats(torch.zeros(3, 3), torch.zeros(()))}
    handles = linear_hooks({"w": (layer, False)}, stats, lambda: mask, inputs=True, outputs=True, reduce=True)
    out = layer(x)
    g = torch.randn_like(out)
    torch.autograd.grad(out, x, g)
    for h in handles:
        h.remove()
    m = mask.unsqueeze(-1).double()
    mean_x = (x.detach() * m).sum(1) / m.sum(1)
    torch.testing.assert_close(stats["w"].a, mean_x.T @ mean_x)
    assert stats["w"].tokens == 2
    torch.testing.assert_close(stats["w"].b, ((g * m).sum(1)).pow(2).sum(0))
