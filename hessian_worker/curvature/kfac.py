"""K-FAC backend: each linear layer's curvature as a Kronecker product of two small factors.

For y = W x at every token, the GGN block of W is approximated (K-FAC "expand", Eschenhagen et al.
2023) as H_l ≈ A_l ⊗ B_l with A_l = E[x xᵀ] over real tokens and B_l = Σ_tokens E[γ γᵀ], γ the
gradient of a sampled pseudo-loss at the layer's output (E[ggᵀ] at the model output = the output
loss's Hessian, so E over the draws gives the GGN). Both factors come from one forward and one
backward pass and never need the whole model at once, so the same statistics stream block by
block through an LLM (hessian_worker/llm).

Pricing every pair of a family is where the cost is: q_l(D) = tr(B_l D A_l Dᵀ) for all m² (l, j)
with D = W_j − W_l. Two structures keep that a fraction of a forward pass:
- B_l is diagonal (b_l: per output unit), so the form splits over output rows and a family is
  priced row block by row block (weights read in slices, never a whole family in memory);
- A_l is kept as its top ``rank`` eigenpairs plus one bulk value σ_l for the rest (the mean of the
  remaining spectrum, from the exact trace), so q_l(D) = Σ_a b_a [Σ_k (λ_k − σ)(D u_k)_a² + σ‖D_a‖²]
  costs one [rows, in] x [in, rank] product per layer pair instead of one [rows, in] x [in, in].
With ``rank=None`` A_l is kept whole (exact K-FAC; small models and tests).

Without the output factor (``OutputFactor.identity``, B_l = 2I) the form is the layerwise
backend's reconstruction error 2·tr(D A_l Dᵀ): the streamed counterpart of ``layerwise``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hessian_worker.costs import FamilyPairs
from hessian_worker.curvature.layerwise import linear_modules
from hessian_worker.data import Calibration, call_model
from hessian_worker.losses import extract_output, row_mask
from hessian_worker.options import Approximation, OutputFactor

RowBlock = Callable[[slice], Tensor]
"""rows -> [m, len(rows), in]: those output rows of every member of a family, as [out, in] weights."""


def sketch_width(dim: int, rank: int | None, oversample: int) -> int | None:
    """Columns of the input sketch, or None when A is kept whole (no rank, or a sketch as wide as A)."""
    if rank is None or rank + oversample >= dim:
        return None
    return rank + oversample


def probe_matrix(dim: int, width: int, seed: int) -> Tensor:
    """[dim, width] Gaussian test matrix of every layer whose inputs have ``dim`` features: one per
    width and seed, drawn on CPU in float64, so the in-memory and the streamed statistics agree."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + dim)
    return torch.randn(dim, width, generator=gen, dtype=torch.float64)


@functools.lru_cache(maxsize=16)
def _shared_probe(dim: int, width: int, seed: int, dtype: torch.dtype, device: str) -> Tensor:
    """One copy of a test matrix for all the layers that use it (read-only)."""
    return probe_matrix(dim, width, seed).to(device=device, dtype=dtype)


@dataclass
class FactorStats:
    """Running sums of one layer's factors, in float32 (float64 when the model is): ``a`` is
    Σ x xᵀ ([in, in]) or its sketch Σ x xᵀ Ω ([in, width]); ``a_trace`` Σ ‖x‖²; ``b`` Σ γ²."""

    a: Tensor
    a_trace: Tensor
    tokens: int = 0
    b: Tensor | None = None
    omega: Tensor | None = None  # the sketch's test matrix (None: A whole)

    def add_inputs(self, x: Tensor) -> None:
        """x: [rows, in] real-token inputs."""
        x = x.to(self.a.dtype)
        if self.omega is None:
            self.a.addmm_(x.T, x)
        else:
            self.a.addmm_(x.T, x @ self.omega)
        self.a_trace += x.pow(2).sum()
        self.tokens += x.shape[0]

    def add_output_grads(self, g: Tensor) -> None:
        """g: [rows, out] real-token gradients at the layer's output."""
        g2 = g.to(self.a.dtype).pow(2).sum(dim=0)
        self.b = g2 if self.b is None else self.b + g2


def new_stats(in_dim: int, *, rank: int | None, oversample: int, seed: int, dtype: torch.dtype,
              device: torch.device | str) -> FactorStats:
    width = sketch_width(in_dim, rank, oversample)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    omega = None if width is None else _shared_probe(in_dim, width, seed, acc, str(torch.device(device)))
    cols = in_dim if width is None else width
    return FactorStats(torch.zeros(in_dim, cols, dtype=acc, device=device),
                       torch.zeros((), dtype=acc, device=device), omega=omega)


@dataclass
class InputFactor:
    """A_l ≈ U diag(λ) Uᵀ + σ (I − U Uᵀ): top eigenpairs and the mean of the rest of the spectrum."""

    vectors: Tensor  # [in, r] orthonormal columns
    values: Tensor  # [r], descending
    bulk: float  # σ

    @property
    def weights(self) -> Tensor:
        """λ − σ: what each eigendirection adds over the bulk."""
        return self.values - self.bulk


def input_factor(stats: FactorStats, rank: int | None) -> InputFactor:
    """The mean input covariance A = Σ x xᵀ / N, kept to ``rank`` eigenpairs (all with None)."""
    n = max(stats.tokens, 1)
    dim = stats.a.shape[0]
    trace = float(stats.a_trace) / n
    if stats.omega is None:
        values, vectors = torch.linalg.eigh(stats.a.double() / n)
        values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    else:
        values, vectors = _nystrom(stats.a.double() / n, stats.omega.double(), torch.finfo(stats.a.dtype).eps)
    keep = dim if rank is None else min(rank, values.numel())
    values, vectors = values[:keep], vectors[:, :keep]
    rest = dim - keep
    bulk = max(trace - float(values.sum()), 0.0) / rest if rest > 0 else 0.0
    dtype = stats.a.dtype
    return InputFactor(vectors.to(dtype).contiguous(), values.to(dtype), bulk)


def _nystrom(y: Tensor, omega: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Eigenpairs of the Nyström approximation Y (ΩᵀY)⁺ Yᵀ of a PSD A from its sketch Y = AΩ
    (Tropp et al. 2017, Alg. 3: the shift ν, at the precision ``eps`` the sketch was summed in,
    keeps the Cholesky stable; ‖Y‖_F stands in for ‖Y‖₂, a slightly larger shift at no SVD)."""
    nu = eps * math.sqrt(y.shape[0]) * float(torch.linalg.vector_norm(y))
    y_nu = y + nu * omega
    core = omega.T @ y_nu
    chol, info = torch.linalg.cholesky_ex((core + core.T) / 2)
    if int(info) != 0:  # rounding left ΩᵀAΩ indefinite: shift past its least eigenvalue
        extra = 2 * max(-float(torch.linalg.eigvalsh((core + core.T) / 2)[0]), nu)
        y_nu = y_nu + extra * omega
        core = omega.T @ y_nu
        chol = torch.linalg.cholesky((core + core.T) / 2)
        nu += extra
    factor = torch.linalg.solve_triangular(chol, y_nu.T, upper=False).T  # F = Y_ν C⁻ᵀ, Â_ν = F Fᵀ
    # F's left singular pairs from the small Gram FᵀF = V S² Vᵀ: U = F V / S (no [in, k] SVD)
    s2, v = torch.linalg.eigh(factor.T @ factor)
    s2, v = s2.flip(0), v.flip(1)
    keep = s2 > s2[0].clamp_min(0.0) * torch.finfo(torch.float64).eps ** 0.5
    s2, v = s2[keep], v[:, keep]
    u = factor @ (v / s2.sqrt())
    return (s2 - nu).clamp_min(0.0), u


@dataclass
class LayerFactors:
    """One layer's K-FAC factors: its input factor and its output weights (b, per output row)."""

    input: InputFactor
    output: Tensor  # [out]

    @classmethod
    def of(cls, stats: FactorStats, rank: int | None, output: OutputFactor, out_dim: int) -> LayerFactors:
        factor = input_factor(stats, rank)
        if output is OutputFactor.identity:
            return cls(factor, torch.full((out_dim,), 2.0, dtype=factor.values.dtype, device=factor.values.device))
        if stats.b is None:
            raise ValueError("output gradients were not collected: the diagonal output factor needs them")
        return cls(factor, stats.b.to(factor.values.dtype))


def row_block_quads(factors: Sequence[LayerFactors], rows_of: RowBlock, out_dim: int, *,
                    block_rows: int = 256) -> Tensor:
    """table[l, j] = tr(B_l (W_j − W_l) A_l (W_j − W_l)ᵀ) for every ordered pair of one family.

    Output rows are independent under a diagonal B, so the family is read ``block_rows`` rows at a
    time (all members' rows together) and each block adds its part: one product of the block with
    every member's eigenvectors, and the members' row Gram for the bulk.
    """
    m = len(factors)
    dtype = factors[0].input.vectors.dtype
    device = factors[0].input.vectors.device
    table = torch.zeros(m, m, dtype=dtype, device=device)
    vectors = torch.cat([f.input.vectors for f in factors], dim=1)  # [in, Σ r_l]
    widths = [f.input.vectors.shape[1] for f in factors]
    starts = [sum(widths[:i]) for i in range(m)]
    for r0 in range(0, out_dim, block_rows):
        rows = slice(r0, min(r0 + block_rows, out_dim))
        w = rows_of(rows).to(device=device, dtype=dtype)  # [m, rows, in]
        proj = torch.matmul(w, vectors)  # [m, rows, Σ r_l]
        sq = torch.linalg.vector_norm(w, dim=2).pow(2)  # [m, rows]: ‖W_j,a‖², no [m, rows, in] temporary
        flat = w.reshape(m, -1)
        for layer, f in enumerate(factors):
            b = f.output[rows]  # [rows]
            z = proj[:, :, starts[layer] : starts[layer] + widths[layer]]  # [m, rows, r_l]: W_j u_k
            dz = z - z[layer]  # rows of D_j U_l
            table[layer] += torch.einsum("jak,k,a->j", dz.pow(2), f.input.weights, b)
            if f.input.bulk:
                cross = flat @ (w[layer] * b[:, None]).reshape(-1)  # Σ_a b_a <W_j,a, W_l,a>
                norms = (sq * b).sum(dim=1)  # Σ_a b_a ‖W_j,a‖²
                table[layer] += f.input.bulk * (norms + norms[layer] - 2 * cross)
    return table


def _as_rows(weight: Tensor, transposed: bool) -> Tensor:
    return weight.T if transposed else weight


@dataclass
class KFACCurvature:
    """δᵀHδ = Σ_l tr(B_l Δ_l A_l Δ_lᵀ) over the factors of each named linear layer."""

    factors: dict[str, LayerFactors]
    transposed: dict[str, bool] = field(default_factory=dict)
    block_rows: int = 256

    def quad(self, deltas: Mapping[str, Tensor]) -> Tensor:
        total = None
        for name, d in deltas.items():
            f = self.factors[name]
            d = d.transpose(1, 2) if self.transposed.get(name) else d  # [n, out, in]
            d = d.to(f.input.vectors.dtype)
            z = torch.matmul(d, f.input.vectors)  # [n, out, r]
            q = torch.einsum("nak,k,a->n", z.pow(2), f.input.weights, f.output)
            if f.input.bulk:
                q = q + f.input.bulk * torch.einsum("nai,a->n", d.pow(2), f.output)
            total = q if total is None else total + q
        assert total is not None
        return total

    def quad_pairs(self, family: FamilyPairs) -> Tensor:
        """Every pair of a family from the row-blocked table (no direction over the family formed)."""
        names = family.names
        rows = [_as_rows(w, self.transposed.get(n, False)) for n, w in zip(names, family.weights, strict=True)]

        def rows_of(sl: slice) -> Tensor:
            return torch.stack([w[sl] for w in rows])

        table = row_block_quads([self.factors[n] for n in names], rows_of, rows[0].shape[0],
                                block_rows=self.block_rows)
        at_a, at_b = family.sides(table)
        alpha, beta = family.coef
        return alpha**2 * at_a + beta**2 * at_b


def output_gradient_sample(y: Tensor, loss: str, weight: float, rows: Tensor | None,
                           generator: torch.Generator) -> Tensor:
    """A random g with E[g gᵀ] = weight · ∇²ℓ(y) at the reference (the output loss's GGN factor).

    ``loss`` names the distillation loss of hessian_worker.losses (a mean over ``rows``, the real
    rows' mask, or all rows): kl draws a label ŷ ~ softmax(y) per row (g = p − e_ŷ, whose covariance
    is the softmax Fisher diag(p) − ppᵀ); mse and cosine use Gaussian z through their Hessians'
    square roots (√(2/n)·I; (I − ŷŷᵀ)/‖y‖ per row, ŷ = y/‖y‖). Drawn on CPU, so a seed means the
    same on every device.
    """
    # float32 work for lower precisions (the result is cast back to theirs), float64 for float64
    work = torch.float64 if y.dtype == torch.float64 else torch.float32
    flat = y.detach().reshape(-1, y.shape[-1]).to(work)
    mask = rows.reshape(-1).to(work) if rows is not None else None
    count = float(mask.sum().clamp_min(1.0)) if mask is not None else flat.shape[0]
    if loss == "kl":
        p = torch.softmax(flat, dim=-1)
        # inverse-CDF draws from uniforms of the seeded generator: one per row, so the same on any
        # device (torch.multinomial took 1 s for 1,024 rows of a 32,000-token vocabulary, this 0.1 s)
        u = _noise(loss, tuple(flat.shape), generator).to(p.device, work)
        cdf = p.cumsum(dim=-1)
        labels = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max(p.shape[-1] - 1)
        g = p.clone()
        g.scatter_add_(1, labels, -torch.ones_like(labels, dtype=g.dtype))
        g = g * math.sqrt(weight / count)
    elif loss == "mse":
        z = _noise(loss, tuple(flat.shape), generator).to(flat.device, work)
        g = z * math.sqrt(2.0 * weight / flat.numel())
    elif loss == "cosine":
        z = _noise(loss, tuple(flat.shape), generator).to(flat.device, work)
        norm = flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        unit = flat / norm
        g = (z - unit * (unit * z).sum(dim=1, keepdim=True)) / norm * math.sqrt(weight / count)
    else:
        raise ValueError(f"no output-gradient sampler for loss {loss!r}: use kl, mse or cosine")
    if mask is not None and loss != "mse":
        g = g * mask[:, None]
    return g.reshape(y.shape).to(y.dtype)


def _noise(loss: str, shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """The random numbers ``output_gradient_sample`` takes for a [rows, width] output (the only place
    it uses the generator): a uniform per row for kl, a Gaussian per entry for mse and cosine."""
    if loss == "kl":
        return torch.rand(shape[0], 1, generator=generator, dtype=torch.float64)
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def skip_output_draws(shape: Sequence[int], loss: str, generator: torch.Generator) -> None:
    """Advances ``generator`` past the draws ``output_gradient_sample`` makes for an output of
    ``shape``: a process that runs only some of the batches (torch.distributed) then draws for each
    of its own what one process running them all does."""
    if loss in ("kl", "mse", "cosine"):
        _noise(loss, (math.prod(shape[:-1]), shape[-1]), generator)


def linear_hooks(modules: Mapping[str, tuple[nn.Module, bool]], stats: Mapping[str, FactorStats],
                 mask: Callable[[], Tensor | None], *, inputs: bool, outputs: bool,
                 reduce: bool = False) -> list:
    """Forward hooks that feed each named linear layer's inputs (and, on backward, its output
    gradients) into its running sums, real tokens only (``mask()``: the current batch's mask).
    With ``reduce``, a sample's tokens become one row: the mean of its inputs, the sum of its
    output gradients."""

    def rows_of(t: Tensor, pool: str) -> Tensor:
        m = mask()
        per_token = m is not None and t.dim() == 3 and tuple(t.shape[:2]) == tuple(m.shape)
        if reduce and t.dim() == 3:
            w = m.to(t.dtype).unsqueeze(-1) if per_token else torch.ones_like(t[..., :1])
            total = (t * w).sum(dim=1)
            return total / w.sum(dim=1).clamp_min(1.0) if pool == "mean" else total
        if per_token:
            t = t[m.bool()]
        return t.reshape(-1, t.shape[-1])

    handles = []
    for name, (module, _) in modules.items():
        s = stats[name]
        if inputs:
            def pre(mod: nn.Module, args: tuple, s: FactorStats = s) -> None:
                s.add_inputs(rows_of(args[0].detach(), "mean"))

            handles.append(module.register_forward_pre_hook(pre))
        if outputs:
            def post(mod: nn.Module, args: tuple, out: Tensor, s: FactorStats = s) -> None:
                if out.requires_grad:
                    out.register_hook(lambda g, s=s: s.add_output_grads(rows_of(g, "sum")))

            handles.append(module.register_forward_hook(post))
    return handles


def gradient_batches(data: Calibration, samples: int | None) -> list[tuple[int, int]]:
    """(batch, rows) of the samples whose output gradients feed the output factor: the first
    ``samples`` of the (already shuffled) calibration set, all with None. The output factor is a
    Monte-Carlo second moment, so a subset estimates it (K-FAC's usual subsampling) at a fraction of
    the backward passes; both the in-memory and the streamed path take exactly these rows."""
    plan, left = [], data.num_samples if samples is None else min(samples, data.num_samples)
    for b, size in enumerate(data.sizes):
        if left <= 0:
            break
        plan.append((b, min(size, left)))
        left -= size
    return plan


def head_rows(batch: Mapping[str, Tensor], rows: int) -> dict[str, Tensor]:
    """The first ``rows`` samples of a batch."""
    return {k: v[:rows] for k, v in batch.items()}


def collect_factors(model: nn.Module, data: Calibration, names: Sequence[str], *, loss: str,
                    rank: int | None, oversample: int, output: OutputFactor, seed: int,
                    gradient_samples: int | None = None, approximation: Approximation = Approximation.auto,
                    progress: bool = False) -> KFACCurvature:
    """K-FAC factors of the named linear layers, with the model held in memory: one forward per
    batch (inputs) and, for the diagonal output factor, a forward and a backward of a sampled
    pseudo-loss per gradient batch (``gradient_batches``). The streamed counterpart, with the same
    draws in the same order, is hessian_worker.llm.stream."""
    modules = linear_modules(model, names)
    param = next(iter(model.parameters()))
    stats = {n: new_stats(_in_dim(m, t), rank=rank, oversample=oversample, seed=seed, dtype=param.dtype,
                          device=param.device) for n, (m, t) in modules.items()}
    current: dict[str, Tensor | None] = {"mask": None}
    reduce = approximation is Approximation.reduce
    if approximation is Approximation.auto:  # per-token outputs (logits) expand, pooled outputs reduce
        with torch.no_grad():
            first = data.batches[0]
            reduce = extract_output(call_model(model, first), first)[0].dim() < 3
    handles = linear_hooks(modules, stats, lambda: current["mask"], inputs=True, outputs=False, reduce=reduce)
    try:
        with torch.no_grad():
            for batch in tqdm(data.batches, desc="K-FAC inputs", disable=not progress, leave=False):
                current["mask"] = batch.get("attention_mask")
                call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    if output is OutputFactor.diagonal:
        _collect_output_grads(model, data, modules, stats, loss, seed, gradient_samples, reduce, progress)
    factors = {n: LayerFactors.of(stats[n], rank, output, _out_dim(*modules[n])) for n in names}
    return KFACCurvature(factors, {n: t for n, (_, t) in modules.items()})


def _collect_output_grads(model: nn.Module, data: Calibration, modules: Mapping[str, tuple[nn.Module, bool]],
                          stats: Mapping[str, FactorStats], loss: str, seed: int, samples: int | None,
                          reduce: bool, progress: bool) -> None:
    current: dict[str, Tensor | None] = {"mask": None}
    handles = linear_hooks(modules, stats, lambda: current["mask"], inputs=False, outputs=True, reduce=reduce)
    weights = [m.weight for m, _ in modules.values()]
    flags = [w.requires_grad for w in weights]
    generator = torch.Generator().manual_seed(seed)
    plan = gradient_batches(data, samples)
    total = sum(rows for _, rows in plan)
    try:
        for w in weights:
            w.requires_grad_(True)
        for b, rows in tqdm(plan, desc="K-FAC output gradients", disable=not progress, leave=False):
            batch = head_rows(data.batches[b], rows)
            current["mask"] = batch.get("attention_mask")
            with torch.enable_grad():
                y, _ = extract_output(call_model(model, batch), batch)
                g = output_gradient_sample(y, loss, rows / total, row_mask(y, batch), generator)
                torch.autograd.grad(y, weights, g, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)


def _in_dim(module: nn.Module, transposed: bool) -> int:
    return int(module.weight.shape[0 if transposed else 1])


def _out_dim(module: nn.Module, transposed: bool) -> int:
    return int(module.weight.shape[1 if transposed else 0])
