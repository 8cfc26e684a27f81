"""Every curvature backend against dense autograd references on tiny float64 models."""

from __future__ import annotations

import pytest
import torch
from hw_cases import dense_ggn, dense_hessian, mlp_data, quad_dense, random_params, shapes, tiny_mlp

from hessian_worker.curvature.base import CurvatureKind, flatten, unflatten
from hessian_worker.curvature.diagonal import DiagonalCurvature, DiagonalMethod, estimate_diagonal
from hessian_worker.curvature.exact import ExactCurvature
from hessian_worker.curvature.functional import ggn_hvp, ggn_quad_form, hessian_hvp
from hessian_worker.curvature.hutchinson import trace
from hessian_worker.curvature.lanczos import lanczos
from hessian_worker.curvature.projected import ProjectedCurvature
from hessian_worker.discovery import discover_layers
from hessian_worker.objective import Objective


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-8) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


@pytest.mark.parametrize("case", ["mlp_obj", "logits_obj", "bert_obj"])
def test_ggn_quad_form_matches_dense(case: str, request: pytest.FixtureRequest) -> None:
    obj: Objective = request.getfixturevalue(case)
    deltas = random_params(obj, 5)
    dense = quad_dense(dense_ggn(obj), obj, deltas)
    got = ExactCurvature(obj, CurvatureKind.ggn, chunk=2).quad(deltas)
    assert float(dense.min()) > 0
    _close(got, dense)


def test_mse_ggn_constant_is_two_over_numel(mlp_obj: Objective) -> None:
    """For mean-squared error H_out = 2/numel·I, so δᵀGδ = Σ_b w_b·2/numel_b·‖J_bδ‖²."""
    deltas = random_params(mlp_obj, 1)
    one = {k: v[0] for k, v in deltas.items()}
    expected = 0.0
    for b, w in enumerate(mlp_obj.weights):
        y, jv = torch.func.jvp(lambda p, b=b: mlp_obj.output(p, b), (mlp_obj.params0,), (one,))
        expected += w * 2.0 / y.numel() * float(jv.pow(2).sum())
    assert float(ggn_quad_form(mlp_obj)(one)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("case", ["mlp_obj", "bert_query_obj"])
def test_full_hessian_quad_form_matches_dense_and_ggn_at_reference(case: str, request: pytest.FixtureRequest) -> None:
    obj: Objective = request.getfixturevalue(case)
    deltas = random_params(obj, 3)
    hess = dense_hessian(obj)
    got = ExactCurvature(obj, CurvatureKind.hessian, chunk=3).quad(deltas)
    _close(got, quad_dense(hess, obj, deltas))
    # self-distillation: residuals vanish at the reference, so H equals the GGN there
    _close(hess, dense_ggn(obj), rtol=1e-7)


def test_full_hessian_differs_from_ggn_for_task_loss() -> None:
    model = tiny_mlp()
    names = [x.name for x in discover_layers(model)]
    obj = Objective(model, mlp_data(), names, task_loss=lambda y, batch: y.sin().sum(dim=1).mean())
    deltas = random_params(obj, 4)
    hess, ggn = dense_hessian(obj), dense_ggn(obj)
    assert float((hess - ggn).abs().max()) > 1e-3 * float(hess.abs().max())
    _close(ExactCurvature(obj, CurvatureKind.hessian).quad(deltas), quad_dense(hess, obj, deltas))
    _close(ExactCurvature(obj, CurvatureKind.ggn).quad(deltas), quad_dense(ggn, obj, deltas))


@pytest.mark.parametrize("kind", [CurvatureKind.ggn, CurvatureKind.hessian])
def test_hvp_matches_dense(mlp_obj: Objective, kind: CurvatureKind) -> None:
    obj = mlp_obj
    mat = dense_ggn(obj) if kind is CurvatureKind.ggn else dense_hessian(obj)
    v = {k: d[0] for k, d in random_params(obj, 1).items()}
    hvp = ggn_hvp(obj) if kind is CurvatureKind.ggn else hessian_hvp(obj)
    got = flatten(hvp(v), obj.names)
    _close(got, mat @ flatten(v, obj.names))


def test_lanczos_matches_eigvalsh(mlp_obj: Objective) -> None:
    obj = mlp_obj
    ggn = dense_ggn(obj)
    exact = torch.linalg.eigvalsh(ggn).flip(0)
    hvp = ggn_hvp(obj)
    sh = shapes(obj)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return flatten(hvp(unflatten(v, sh)), obj.names)

    evals, vecs = lanczos(matvec, ggn.shape[0], 4, 30, torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(evals, exact[:4], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(4), atol=1e-8, rtol=0)
    # Ritz pairs are eigenpairs: G u = λ u
    _close(ggn @ vecs, vecs * evals, rtol=1e-5)


def test_lanczos_is_seeded() -> None:
    mat = torch.randn(30, 30, generator=torch.Generator().manual_seed(3))
    mat = mat @ mat.T
    runs = [lanczos(lambda v: mat @ v, 30, 3, 10, torch.Generator().manual_seed(7), dtype=torch.float64)
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])


def test_lanczos_full_krylov_recovers_spectrum_with_invariant_subspace() -> None:
    """A rank-3 operator: the Krylov space closes early and Lanczos must restart cleanly."""
    g = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(12, 3, generator=g))
    mat = q @ torch.diag(torch.tensor([5.0, 2.0, 1.0])) @ q.T
    evals, _ = lanczos(lambda v: mat @ v, 12, 5, 12, torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(evals, torch.tensor([5.0, 2.0, 1.0, 0.0, 0.0]), atol=1e-9, rtol=0)


def test_hutchinson_trace_within_tolerance(mlp_obj: Objective) -> None:
    tr = float(torch.trace(dense_ggn(mlp_obj)))
    est, err = trace(ggn_quad_form(mlp_obj), mlp_obj.params0, 2000, torch.Generator().manual_seed(0), chunk=500)
    assert abs(est - tr) < 4 * err
    assert abs(est - tr) < 0.05 * tr


def test_projected_full_rank_is_exact(mlp_obj: Objective) -> None:
    """With k = d the eigenspace is everything: the projected form is the dense form."""
    obj = mlp_obj
    d = sum(p.numel() for p in obj.params0.values())
    curv = ProjectedCurvature(obj, rank=d, iters=d, generator=torch.Generator().manual_seed(0))
    deltas = random_params(obj, 4)
    _close(curv.quad(deltas), quad_dense(dense_ggn(obj), obj, deltas), rtol=1e-6)


def test_projected_formula_with_bulk(mlp_obj: Objective) -> None:
    obj = mlp_obj
    ggn = dense_ggn(obj)
    curv = ProjectedCurvature(obj, rank=6, iters=30, probes=200, generator=torch.Generator().manual_seed(1))
    evals, vecs = torch.linalg.eigh(ggn)
    lam, u = evals.flip(0)[:6], vecs.flip(1)[:, :6]
    torch.testing.assert_close(curv.eigenvalues, lam, rtol=1e-6, atol=1e-12)
    deltas = random_params(obj, 3)
    vec = torch.cat([deltas[k].reshape(3, -1) for k in obj.names], dim=1)
    proj = vec @ u
    expected = (proj.pow(2) * lam).sum(1) + curv.bulk * (vec.pow(2).sum(1) - proj.pow(2).sum(1))
    _close(curv.quad(deltas), expected, rtol=1e-5)
    # λ̄ = (tr H − Σλ)/(d − k) with tr H from the seeded Hutchinson estimate
    assert curv.bulk == pytest.approx(max((curv.trace - float(lam.sum())) / (ggn.shape[0] - 6), 0.0), rel=1e-9)
    assert abs(curv.trace - float(torch.trace(ggn))) < 4 * curv.trace_err
    # only two layers moved: projecting through their U blocks gives the same number
    two = {k: deltas[k] for k in obj.names[:2]}
    vec2 = torch.cat([two.get(k, torch.zeros_like(deltas[k])).reshape(3, -1) for k in obj.names], dim=1)
    proj2 = vec2 @ u
    exp2 = (proj2.pow(2) * lam).sum(1) + curv.bulk * (vec2.pow(2).sum(1) - proj2.pow(2).sum(1))
    _close(curv.quad(two), exp2, rtol=1e-5)


def test_diagonal_hutchinson_converges(mlp_obj: Objective) -> None:
    diag_true = torch.diagonal(dense_ggn(mlp_obj))
    est = estimate_diagonal(mlp_obj, DiagonalMethod.hutchinson, probes=400, generator=torch.Generator().manual_seed(0))
    got = flatten(est, mlp_obj.names)
    assert float((got - diag_true).norm() / diag_true.norm()) < 0.35
    deltas = random_params(mlp_obj, 3)
    vec = torch.cat([deltas[k].reshape(3, -1) for k in mlp_obj.names], dim=1)
    _close(DiagonalCurvature(est).quad(deltas), (vec.pow(2) * got).sum(1))


def test_empirical_fisher_for_task_loss_and_refused_for_distill(mlp_obj: Objective) -> None:
    model = tiny_mlp()
    names = [x.name for x in discover_layers(model)]
    obj = Objective(model, mlp_data(), names, task_loss=lambda y, batch: y.pow(2).sum(dim=1).mean())
    fisher = estimate_diagonal(obj, DiagonalMethod.fisher, probes=1, generator=torch.Generator())
    rows = obj.data.rows()["input"]
    expected = {k: torch.zeros_like(p) for k, p in obj.params0.items()}
    for x in rows:
        g = torch.func.grad(lambda p, x=x: obj.task_loss(torch.func.functional_call(model, p, (x[None],), strict=False), {}))(obj.params0)
        for k in expected:
            expected[k] += g[k].pow(2) / len(rows)
    for k in expected:
        _close(fisher[k], expected[k])
    from hessian_worker.errors import BackendError

    with pytest.raises(BackendError, match="hutchinson"):
        estimate_diagonal(mlp_obj, DiagonalMethod.fisher, probes=1, generator=torch.Generator())


def test_causal_lm_token_kl_ggn_matches_dense_and_skips_padding() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from hessian_worker.data import Calibration
    from hessian_worker.losses import kl

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=11, n_positions=16, attn_implementation="eager",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).double().eval()
    ids = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[2, 3:] = 0
    data = Calibration([{"input_ids": ids, "attention_mask": mask}])
    names = [x.name for x in discover_layers(model, targets=["re:.*mlp\\.c_proj\\.weight"])]
    obj = Objective(model, data, names)
    assert obj.out_loss is kl
    deltas = random_params(obj, 3)
    _close(ExactCurvature(obj).quad(deltas), quad_dense(dense_ggn(obj), obj, deltas))
    # padded positions do not count: changing their logits leaves the loss at zero
    y = obj.targets[0].clone()
    y[2, 4, 3] += 5.0
    assert float(obj.loss_on_output(y, 0)) == pytest.approx(0.0, abs=1e-12)
    y[2, 1, 3] += 5.0
    assert float(obj.loss_on_output(y, 0)) > 1e-3


@pytest.mark.parametrize("case", ["mlp_obj", "logits_obj"])
def test_mc_ggn_diagonal_converges(case: str, request: pytest.FixtureRequest) -> None:
    """E[(Jᵀs)²] = diag(JᵀH_out J) when E[ssᵀ] = H_out (normal for MSE, categorical for KL)."""
    obj: Objective = request.getfixturevalue(case)
    diag_true = torch.diagonal(dense_ggn(obj))
    est = estimate_diagonal(obj, DiagonalMethod.mc, probes=3000, generator=torch.Generator().manual_seed(0))
    got = flatten(est, obj.names)
    assert float((got - diag_true).norm() / diag_true.norm()) < 0.06
    auto = estimate_diagonal(obj, DiagonalMethod.auto, probes=3000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(flatten(auto, obj.names), got)


def test_mc_ggn_diagonal_with_padded_token_kl() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from hessian_worker.data import Calibration

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=7, n_positions=16, attn_implementation="eager",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).double().eval()
    ids = torch.randint(0, 7, (2, 4), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    obj = Objective(model, Calibration([{"input_ids": ids, "attention_mask": mask}]),
                    [x.name for x in discover_layers(model, targets=["re:.*attn\\.c_proj\\.weight"])])
    diag_true = torch.diagonal(dense_ggn(obj))
    got = flatten(estimate_diagonal(obj, DiagonalMethod.mc, probes=3000, generator=torch.Generator().manual_seed(0)),
                  obj.names)
    assert float((got - diag_true).norm() / diag_true.norm()) < 0.08


def test_mc_ggn_diagonal_converges_for_cosine_distillation() -> None:
    """The cosine loss's output Hessian factor: E[ssᵀ] = (I - t̂t̂ᵀ)/(|t|²R) per row."""
    from hw_cases import mlp_data, tiny_mlp

    from hessian_worker.discovery import discover_layers
    from hessian_worker.losses import DistillLoss

    model = tiny_mlp()
    obj = Objective(model, mlp_data(), [x.name for x in discover_layers(model)], DistillLoss.cosine)
    diag_true = torch.diagonal(dense_ggn(obj))
    est = estimate_diagonal(obj, DiagonalMethod.mc, probes=3000, generator=torch.Generator().manual_seed(0))
    got = flatten(est, obj.names)
    assert float((got - diag_true).norm() / diag_true.norm()) < 0.06
