"""Layerwise backend: input covariances, quadratic form and closed-form merge against brute force."""

from __future__ import annotations

import pytest
import torch
from hw_cases import bert_data, mlp_data, tiny_bert, tiny_mlp

from hessian_worker.curvature.layerwise import (
    LayerwiseCurvature,
    input_covariances,
    input_moments,
    layerwise_merge,
)
from hessian_worker.errors import BackendError


def _block_inputs(model, x: torch.Tensor) -> list[torch.Tensor]:
    h = torch.tanh(model.inp(x))
    out = []
    for block in model.blocks:
        out.append(h)
        h = block(h)
    return out


def test_covariances_and_quad_match_brute_force() -> None:
    model, data = tiny_mlp(), mlp_data()
    names = [f"blocks.{i}.fc.weight" for i in range(3)]
    curv = LayerwiseCurvature.collect(model, data, names)
    with torch.no_grad():
        xs = _block_inputs(model, data.rows()["input"])
    for name, x in zip(names, xs, strict=True):
        torch.testing.assert_close(curv.cov[name], x.T @ x / x.shape[0])
    g = torch.Generator().manual_seed(0)
    deltas = {n: torch.randn(2, 4, 4, generator=g) for n in names[:2]}
    # ½·quad is the mean squared change of the layer outputs, summed over layers
    expected = sum((xs[i] @ deltas[names[i]].transpose(1, 2)).pow(2).sum(dim=(1, 2)) / xs[i].shape[0]
                   for i in range(2))
    torch.testing.assert_close(0.5 * curv.quad(deltas), expected)


def test_padding_rows_are_skipped() -> None:
    model, data = tiny_bert(), bert_data()
    name = "encoder.layer.0.attention.self.query.weight"
    seen = []
    hook = model.encoder.layer[0].attention.self.query.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].detach()))
    masks = []
    with torch.no_grad():
        for b in data.batches:
            model(**b)
            masks.append(b["attention_mask"].bool())
    hook.remove()
    rows = torch.cat([x[m] for x, m in zip(seen, masks, strict=True)])
    cov = input_covariances(model, data, [name])[name]
    torch.testing.assert_close(cov, rows.T @ rows / rows.shape[0])
    assert rows.shape[0] == int(sum(m.sum() for m in masks)) < 30
    # the shrinkage's moments: rows and samples counted, Σ_u ‖X_uᵀX_u‖²_F over each sample's real rows
    moments = input_moments(model, data, [name], squares=True)[name]
    torch.testing.assert_close(moments.covariance, cov)
    assert (moments.rows, moments.units) == (rows.shape[0], 5)
    per_sample = [x[i][k[i]] for x, k in zip(seen, masks, strict=True) for i in range(len(x))]
    assert moments.unit_square == pytest.approx(sum(float((s.T @ s).pow(2).sum()) for s in per_sample))


def test_closed_form_merge_matches_kronecker_normal_equations() -> None:
    g = torch.Generator().manual_seed(1)
    out_dim, in_dim = 3, 5
    ws = [torch.randn(out_dim, in_dim, generator=g) for _ in range(3)]
    covs = []
    for _ in range(3):
        x = torch.randn(7, in_dim, generator=g)
        covs.append(x.T @ x / 7)
    merged = layerwise_merge(ws, covs, damping=0.0)
    eye = torch.eye(out_dim)
    a = sum(torch.kron(eye, c) for c in covs)
    b = sum(torch.kron(eye, c) @ w.reshape(-1) for w, c in zip(ws, covs, strict=True))
    brute = torch.linalg.solve(a, b).reshape(out_dim, in_dim)
    torch.testing.assert_close(merged, brute)

    def objective(w: torch.Tensor) -> float:
        return float(sum(torch.trace((w - wk) @ c @ (w - wk).T) for wk, c in zip(ws, covs, strict=True)))

    assert objective(merged) < objective(torch.stack(ws).mean(0))
    for _ in range(5):
        assert objective(merged) <= objective(merged + 1e-3 * torch.randn(out_dim, in_dim, generator=g))
    # transposed storage (GPT-2 Conv1D, [in, out]) gives the transposed answer
    torch.testing.assert_close(layerwise_merge([w.T for w in ws], covs, transposed=True, damping=0.0), merged.T)


def test_damping_pulls_toward_the_members_mean_not_zero() -> None:
    """Rank-deficient inputs (3 rows, 6 inputs): the damped merge is the minimiser of
    Σ_k tr((W−W_k) G_k (W−W_k)ᵀ) + λ/m Σ_k ‖W−W_k‖², so identical members merge to themselves
    and unexcited directions keep the mean (damping toward zero shrank them)."""
    g = torch.Generator().manual_seed(3)
    out_dim, in_dim, damping = 4, 6, 0.1
    x = [torch.randn(3, in_dim, generator=g, dtype=torch.float64) for _ in range(2)]
    covs = [xi.T @ xi / 3 for xi in x]
    w = torch.randn(out_dim, in_dim, generator=g, dtype=torch.float64)
    torch.testing.assert_close(layerwise_merge([w, w.clone()], covs, damping=damping), w)
    ws = [w, torch.randn(out_dim, in_dim, generator=g, dtype=torch.float64)]
    lam = damping * float(sum(covs).diagonal().mean())
    eye = torch.eye(out_dim, dtype=torch.float64)
    ridge = torch.eye(in_dim, dtype=torch.float64) * lam / len(ws)
    a = sum(torch.kron(eye, c + ridge) for c in covs)
    b = sum(torch.kron(eye, c + ridge) @ wk.reshape(-1) for wk, c in zip(ws, covs, strict=True))
    torch.testing.assert_close(layerwise_merge(ws, covs, damping=damping), torch.linalg.solve(a, b).reshape(out_dim, in_dim))


def test_conv1d_quad_is_transposed() -> None:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=20, n_positions=16)).double().eval()
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    from hessian_worker.data import Calibration

    data = Calibration([{"input_ids": ids}])
    name = "h.0.mlp.c_fc.weight"
    curv = LayerwiseCurvature.collect(model, data, [name])
    assert curv.transposed[name] and curv.cov[name].shape == (8, 8)
    delta = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(2))
    seen = []
    hook = model.h[0].mlp.c_fc.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    x = seen[0].reshape(-1, 8)
    expected = (x @ delta[0]).pow(2).sum() / x.shape[0]
    torch.testing.assert_close(0.5 * curv.quad({name: delta})[0], expected)


def test_non_linear_weights_are_refused() -> None:
    model = tiny_mlp()
    with pytest.raises(BackendError, match="ignore"):
        LayerwiseCurvature.collect(model, mlp_data(), ["blocks.0.fc.bias"])
