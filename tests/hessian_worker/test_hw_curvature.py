"""Every curvature backend against dense autograd references on tiny float64 models."""

from __future__ import annotations

import pytest
import torch
from hw_cases import dense_ggn, dense_hessian, mlp_data, quad_dense, random_params, shapes, tiny_mlp
from torch import Tensor

from hessian_worker.curvature.base import CurvatureKind, flatten, map_products, unflatten
from hessian_worker.curvature.diagonal import DiagonalCurvature, DiagonalMethod, estimate_diagonal
from hessian_worker.curvature.exact import ExactCurvature
from hessian_worker.curvature.functional import ggn_hvp, ggn_matmat, ggn_quad_form, hessian_hvp
from hessian_worker.curvature.hutchinson import trace
from hessian_worker.curvature.lanczos import lanczos
from hessian_worker.curvature.nystrom import nystrom, sketch_rows
from hessian_worker.curvature.projected import Bulk, Eigensolver, ProjectedCurvature
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


def test_full_hessian_with_functional_mse_loss() -> None:
    """F.mse_loss(reduction='mean') has a broken forward-over-reverse rule (PyTorch #123996, "ZeroTensors
    are immutable"); the Hessian forms fall back to reverse-over-reverse and still match dense."""
    model = tiny_mlp()
    names = [x.name for x in discover_layers(model)]
    target = torch.randn(10, 3, generator=torch.Generator().manual_seed(3))
    obj = Objective(model, mlp_data(n=10, batch=10), names,
                    task_loss=lambda y, batch: torch.nn.functional.mse_loss(y, target))
    deltas = random_params(obj, 3)
    hess = dense_hessian(obj)
    _close(ExactCurvature(obj, CurvatureKind.hessian, chunk=3).quad(deltas), quad_dense(hess, obj, deltas))
    one = {k: v[0] for k, v in deltas.items()}
    _close(flatten(hessian_hvp(obj)(one), obj.names), hess @ flatten(one, obj.names))


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


@pytest.mark.parametrize("eigensolver", [Eigensolver.nystrom, Eigensolver.lanczos])
def test_projected_full_rank_is_exact(mlp_obj: Objective, eigensolver: Eigensolver) -> None:
    """With k = d the eigenspace is everything: the projected form is the dense form."""
    obj = mlp_obj
    d = sum(p.numel() for p in obj.params0.values())
    curv = ProjectedCurvature(obj, rank=d, iters=d, eigensolver=eigensolver,
                              generator=torch.Generator().manual_seed(0))
    deltas = random_params(obj, 4)
    _close(curv.quad(deltas), quad_dense(dense_ggn(obj), obj, deltas), rtol=1e-6)


def _dense_projected(u: Tensor, lam: Tensor, bulks: Tensor, vec: Tensor) -> Tensor:
    """Σλᵢcᵢ² + Σ_j b_j (δ − UUᵀδ)_j² with b_j the bulk of coordinate j's layer, densely."""
    proj = vec @ u
    rest = vec - proj @ u.T
    return (proj.pow(2) * lam).sum(1) + (rest.pow(2) * bulks).sum(1)


def test_projected_isotropic_bulk_is_the_papers_formula(mlp_obj: Objective) -> None:
    obj = mlp_obj
    ggn = dense_ggn(obj)
    curv = ProjectedCurvature(obj, rank=6, iters=30, probes=400, eigensolver=Eigensolver.lanczos,
                              bulk=Bulk.isotropic, generator=torch.Generator().manual_seed(1))
    evals, vecs = torch.linalg.eigh(ggn)
    lam, u = evals.flip(0)[:6], vecs.flip(1)[:, :6]
    torch.testing.assert_close(curv.eigenvalues, lam, rtol=1e-6, atol=1e-12)
    deltas = random_params(obj, 3)
    vec = torch.cat([deltas[k].reshape(3, -1) for k in obj.names], dim=1)
    bulks = torch.full((vec.shape[1],), curv.bulk, dtype=vec.dtype)
    _close(curv.quad(deltas), _dense_projected(u, lam, bulks, vec), rtol=1e-5)
    # λ̄ = (tr H − Σλ)/(d − k) with tr H from the seeded Hutchinson estimate
    assert curv.bulk == pytest.approx(max((curv.trace - float(lam.sum())) / (ggn.shape[0] - 6), 0.0), rel=1e-9)
    assert abs(curv.trace - float(torch.trace(ggn))) < 4 * curv.trace_err
    # only two layers moved: projecting through their U blocks gives the same number
    two = {k: deltas[k] for k in obj.names[:2]}
    vec2 = torch.cat([two.get(k, torch.zeros_like(deltas[k])).reshape(3, -1) for k in obj.names], dim=1)
    _close(curv.quad(two), _dense_projected(u, lam, bulks, vec2), rtol=1e-5)


def _layer_of_coordinates(obj: Objective) -> Tensor:
    return torch.cat([torch.full((obj.params0[n].numel(),), i) for i, n in enumerate(obj.names)])


@pytest.mark.parametrize("eigensolver", [Eigensolver.nystrom, Eigensolver.lanczos])
def test_projected_layer_bulk_formula(mlp_obj: Objective, eigensolver: Eigensolver) -> None:
    """λ̄_ℓ = (tr G_ℓℓ − Σλᵢ‖uᵢ,ℓ‖²)/(d_ℓ − Σ‖uᵢ,ℓ‖²) with the backend's own U, λ and block traces;
    the block traces near the true ones; the quadratic form equal to the dense formula."""
    obj = mlp_obj
    ggn = dense_ggn(obj)
    curv = ProjectedCurvature(obj, rank=4, iters=30, probes=2000, oversample=40, eigensolver=eigensolver,
                              generator=torch.Generator().manual_seed(2))
    layer = _layer_of_coordinates(obj)
    u = torch.cat([curv.blocks[n].reshape(curv.rank, -1) for n in obj.names], dim=1).T
    lam = curv.eigenvalues
    for i, name in enumerate(obj.names):
        mask = layer == i
        w = u[mask].pow(2).sum(0)
        expected = (curv.layer_traces[name] - float((w * lam).sum())) / (int(mask.sum()) - float(w.sum()))
        assert curv.layer_bulk[name] == pytest.approx(max(expected, 0.0), rel=1e-9, abs=1e-15)
        true_trace = float(torch.diagonal(ggn)[mask].sum())
        assert curv.layer_traces[name] == pytest.approx(true_trace, rel=0.25)
    bulks = torch.tensor([curv.layer_bulk[obj.names[int(i)]] for i in layer], dtype=ggn.dtype)
    deltas = random_params(obj, 3)
    vec = torch.cat([deltas[k].reshape(3, -1) for k in obj.names], dim=1)
    _close(curv.quad(deltas), _dense_projected(u, lam, bulks, vec), rtol=1e-8)
    two = {k: deltas[k] for k in obj.names[1:3]}
    vec2 = torch.cat([two.get(k, torch.zeros_like(deltas[k])).reshape(3, -1) for k in obj.names], dim=1)
    _close(curv.quad(two), _dense_projected(u, lam, bulks, vec2), rtol=1e-8)


def test_nystrom_full_sketch_recovers_spectrum_and_block_traces() -> None:
    """A sketch as wide as the matrix reproduces it: every eigenvalue, and every block trace exactly."""
    g = torch.Generator().manual_seed(3)
    sizes = [6, 5, 7]
    scales = torch.cat([torch.full((s,), c) for s, c in zip(sizes, [0.01, 1.0, 30.0], strict=True)]).double()
    dim = sum(sizes)
    top = torch.linalg.qr(torch.randn(dim, 2, generator=g, dtype=torch.float64))[0]
    # layers of very different curvature, plus a steep top eigenspace across them
    mat = torch.diag(scales) + top @ torch.diag(torch.tensor([500.0, 200.0], dtype=torch.float64)) @ top.T
    found = nystrom(lambda rows: rows @ mat, dim, dim, torch.Generator().manual_seed(0), blocks=sizes,
                    dtype=torch.float64)
    exact = torch.linalg.eigvalsh(mat).flip(0)
    # to rounding of the norm: the eigenpairs come from s x s Grams, which square the conditioning
    torch.testing.assert_close(found.eigenvalues, exact, rtol=1e-9, atol=1e-10 * float(exact[0]))
    torch.testing.assert_close(found.eigenvectors.T @ found.eigenvectors, torch.eye(dim, dtype=torch.float64),
                               rtol=0.0, atol=1e-5)  # ~eps·cond(G)²·cond(X)²: the least eigenvalues' vectors
    # worst, and a square Gaussian X (s = dim, only here) is far from orthogonal; at s << dim cond(X) ≈ 1
    # E[dim·ω_bᵀ(Gω)_b] = tr G_bb: the mean over a full orthonormal basis is exact
    starts = [0, 6, 11, 18]
    true_blocks = [float(torch.diagonal(mat)[a:b].sum()) for a, b in zip(starts, starts[1:], strict=False)]
    torch.testing.assert_close(found.block_traces, torch.tensor(true_blocks, dtype=torch.float64), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("dim", "sizes"), [(60, [20, 25, 15]), (100, [35, 40, 25])])
def test_nystrom_top_eigenpairs_and_unbiased_block_traces(dim: int, sizes: list[int]) -> None:
    """dim 60: Gaussian test vectors (the sketch is within 64 of dim); 100: random signs."""
    g = torch.Generator().manual_seed(4)
    q = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    spectrum = 100.0 * 0.5 ** torch.arange(dim, dtype=torch.float64)  # fast decay: a sketch of 14 finds 6
    mat = q @ torch.diag(spectrum) @ q.T
    found = nystrom(lambda rows: rows @ mat, dim, 14, torch.Generator().manual_seed(0), blocks=sizes,
                    dtype=torch.float64)
    torch.testing.assert_close(found.eigenvalues[:3], spectrum[:3], rtol=1e-3, atol=0.0)
    torch.testing.assert_close(found.eigenvalues[:6], spectrum[:6], rtol=0.02, atol=0.0)
    assert bool((found.eigenvalues <= spectrum[:14] * (1 + 1e-9)).all())  # Nyström never overshoots
    align = (found.eigenvectors[:, :4].T @ q[:, :4]).abs().diagonal()
    assert float(align.min()) > 0.999
    # rank: the leading pairs of the same sketch, only fewer formed (the rest of it still sharpens them)
    few = nystrom(lambda rows: rows @ mat, dim, 14, torch.Generator().manual_seed(0), blocks=sizes, rank=4,
                  dtype=torch.float64)
    assert few.eigenvectors.shape == (dim, 4)
    torch.testing.assert_close(few.eigenvalues, found.eigenvalues[:4], rtol=1e-12, atol=0.0)
    torch.testing.assert_close(few.eigenvectors, found.eigenvectors[:, :4], rtol=0.0, atol=1e-12)
    torch.testing.assert_close(few.block_traces, found.block_traces, rtol=1e-12, atol=0.0)
    # block traces: unbiased over seeds (the mean of 200 sketches within 4 standard errors)
    runs = torch.stack([nystrom(lambda rows: rows @ mat, dim, 4, torch.Generator().manual_seed(s), blocks=sizes,
                                dtype=torch.float64).block_traces for s in range(200)])
    starts = [0, sizes[0], sizes[0] + sizes[1]]
    truth = torch.tensor([float(torch.diagonal(mat)[a:a + n].sum()) for a, n in zip(starts, sizes, strict=True)],
                         dtype=torch.float64)
    err = runs.std(0) / 200**0.5
    assert bool(((runs.mean(0) - truth).abs() < 4 * err).all())


@pytest.mark.parametrize("dim", [4000, 4003])
def test_sign_test_rows_are_fair_independent_and_seeded(dim: int) -> None:
    rows = sketch_rows(6, dim, torch.Generator().manual_seed(0), torch.float64, gaussian=False)
    assert rows.shape == (6, dim) and rows.is_contiguous()
    assert set(rows.unique().tolist()) == {-1.0, 1.0}
    # E[xxᵀ] = I: the Gram is dim on the diagonal, O(sqrt(dim)) off it (5 standard deviations)
    gram = rows @ rows.T
    assert bool((gram.diagonal() == dim).all())
    assert float((gram - dim * torch.eye(6, dtype=torch.float64)).abs().max()) < 5 * dim**0.5
    assert torch.equal(rows, sketch_rows(6, dim, torch.Generator().manual_seed(0), torch.float64, gaussian=False))


def test_nystrom_sign_probes_are_exact_on_a_diagonal() -> None:
    """With random signs every probe xᵀG_bb x of a diagonal block is its trace exactly (x_i² = 1):
    the sign estimator is the one in use, and it is Hutchinson on X, not on the orthonormalized Ω."""
    dim, sizes = 90, [30, 40, 20]
    diag = torch.rand(dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    found = nystrom(lambda rows: rows * diag, dim, 6, torch.Generator().manual_seed(0), blocks=sizes,
                    dtype=torch.float64)
    truth = torch.stack([diag[:30].sum(), diag[30:70].sum(), diag[70:].sum()])
    torch.testing.assert_close(found.block_probes, truth[:, None].expand(3, 6), rtol=1e-12, atol=0.0)


def test_nystrom_refused_for_the_full_hessian(mlp_obj: Objective) -> None:
    with pytest.raises(ValueError, match="lanczos"):
        ProjectedCurvature(mlp_obj, rank=2, kind=CurvatureKind.hessian, eigensolver=Eigensolver.nystrom,
                           generator=torch.Generator())
    # auto picks Lanczos for the Hessian
    curv = ProjectedCurvature(mlp_obj, rank=2, kind=CurvatureKind.hessian, generator=torch.Generator())
    assert curv.eigensolver is Eigensolver.lanczos


def test_map_products_batched_equals_one_by_one(mlp_obj: Objective) -> None:
    sh = shapes(mlp_obj)
    rows = torch.randn(5, sum(p.numel() for p in mlp_obj.params0.values()), dtype=torch.float64,
                       generator=torch.Generator().manual_seed(0))
    hvp = ggn_hvp(mlp_obj)
    one = torch.stack([flatten(hvp(unflatten(r, sh)), mlp_obj.names) for r in rows])
    _close(map_products(hvp, rows, sh, chunk=2), one)
    _close(map_products(hvp, rows, sh, chunk=1), one)
    # batch by batch (each batch's graph built once), weighted and summed in place: the same G rows
    assert len(mlp_obj.weights) == 3
    _close(ggn_matmat(mlp_obj, sh, chunk=2)(rows), one)
    _close(ggn_matmat(mlp_obj, sh, chunk=1)(rows), one)


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
