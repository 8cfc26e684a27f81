"""Out-of-sample errors of relaxed fits, and the covariance shrinkage chosen by them.

A relaxed fit (decompose.py) whitens with the damped input covariances G̃_ℓ of the calibration
data. When the calibration tokens are fewer than the width (MiniLM's bench: 16 sentences, ~300
tokens, width 384), G_ℓ is rank-deficient and the shared S and the corrections are free outside the
directions those tokens visit: the in-sample error E = Σ_ℓ tr(δ_ℓ G̃_ℓ δ_ℓᵀ) is far below the error
on other inputs (measured on MiniLM at budget 0.5: 0.10 in sample, 0.73 under other sentences'
covariances for one class per family; bench/results/relaxed-generalization.md), and the fitted
plans lose to plain per-layer SVD, which overfits less. Shrinking G toward μI (μ = tr G/d,
curvature/shrinkage.py) regularizes the fit; how much is a fact about the data, so it is chosen by
cross-fitting: the calibration samples are split in two halves A and B, pairs are fitted on one
half's shrunk covariances and scored under the other half's raw ones (an unbiased estimate of the
error on new inputs), both ways, and the intensity with the least held-out error wins; it was
chosen for half the samples, so it is carried to all of them on the ridge scale
(``full_data_intensity``: measured on MiniLM, the halves' choice applied as is over-shrinks).

The held-out error of a pair fit has a closed form. With the fit's damped covariances G̃₁, G̃₂,
T = (G̃₁ + G̃₂)⁻¹ and the pair residual R = D − E (D = W₁ − W₂, E = Δ₁ − Δ₂), the S-step gives
each member's error δ₁ = S − X₁ = −R G̃₂ T and δ₂ = S − X₂ = R G̃₁ T, so under test covariances
B₁, B₂

    E_test = tr(R M Rᵀ),   M = G̃₂ T B₁ T G̃₂ + G̃₁ T B₂ T G̃₁   (M = H when B = G̃).

The optimum keeps the top 2r singular triplets of D L_H = U Σ Vᵀ, so R = Σ_{i>2r} σ_i u_i v_iᵀ L_H⁻¹
and, the u_i being orthonormal,

    E_test(r) = Σ_{i>2r} σ_i² n_i,   n_i = v_iᵀ L_H⁻¹ M L_H⁻ᵀ v_i,

one SVD per pair for every rank, as the in-sample spectrum (n_i = 1 when B = G̃).

A layer alone (no shared tensor, decompose.alone_fit) overfits less than a shared pair (r·(d_out +
d_in) numbers fitted to one layer, no S), so its shrinkage is chosen on its own: fitted under the
damped G̃, R = Σ_{i>r} σ_i u_i v_iᵀ L⁻¹ with W L = U Σ Vᵀ, and E_test(r) = Σ_{i>r} σ_i² v_iᵀ L⁻¹ B L⁻ᵀ v_i
(``heldout_alone_terms``). Its rank depends on the budget, which the whitening may not (analysis,
measuring and apply must whiten alike), so the held-out errors are summed over the ranks of
``ALONE_SHARES``, the ranks per-layer low rank takes at budgets of about 0.4 to 0.8 (measured on
MiniLM: per-layer SVD whitened unshrunk beat the pairs' shrinkage at every budget, 0.8107 against
0.8052 cosine at 0.5; bench/results/eval-relaxed-exact.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hessian_worker.basis.decompose import DTYPE, damped, lapack_threads, whitening
from hessian_worker.basis.scales import layer_output_scales
from hessian_worker.config import AnalyzeConfig
from hessian_worker.curvature.layerwise import input_moments
from hessian_worker.curvature.shrinkage import SecondMoments, shrink
from hessian_worker.data import Calibration
from hessian_worker.discovery import LayerInfo, discover_layers
from hessian_worker.errors import DataError
from hessian_worker.factored.layers import dense_weights
from hessian_worker.relaxed.costs import alone_key, family_ranks
from hessian_worker.relaxed.decompose import parallel_sum


def heldout_pair_terms(w1: Tensor, w2: Tensor, fit1: Tensor, fit2: Tensor, test1: Tensor, test2: Tensor, *,
                       damping: float = 0.01) -> tuple[Tensor, Tensor]:
    """(σ_i², n_i) of the module docstring, σ descending: the pair fitted under the damped ``fit``
    covariances has held-out error Σ_{i>2r} σ_i² n_i under the ``test`` covariances at rank r."""
    d = w1.to(DTYPE) - w2.to(DTYPE)
    g1, g2 = damped(fit1, damping), damped(fit2, damping)
    b1, b2 = test1.to(DTYPE), test2.to(DTYPE)
    with lapack_threads(d.shape[1]):
        t = torch.linalg.inv(g1 + g2)
        k1, k2 = g1 @ t, g2 @ t  # G̃₁T and G̃₂T; their transposes are T G̃₁ and T G̃₂
        m = k2 @ b1 @ k2.T + k1 @ b2 @ k1.T
        lh = whitening(parallel_sum(g1, g2), 0.0)
        _, s, vh = torch.linalg.svd(d @ lh, full_matrices=False)
        rows = torch.linalg.solve(lh.T, vh.T)  # L_H⁻ᵀ v_i as columns
    n = ((m @ rows) * rows).sum(0)
    return s.pow(2), n


ALONE_SHARES = (0.2, 0.3, 0.4)  # shares of min(d_out, d_in): the ranks that score a layer alone's shrinkage


def heldout_alone_terms(w: Tensor, fit: Tensor, test: Tensor, *, damping: float = 0.01) -> tuple[Tensor, Tensor]:
    """(σ_i², n_i), σ descending: the layer fitted alone under the damped ``fit`` covariance has
    held-out error Σ_{i>r} σ_i² n_i under ``test`` at rank r (module docstring)."""
    lower = whitening(damped(fit, damping), 0.0)
    with lapack_threads(w.shape[1]):
        _, s, vh = torch.linalg.svd(w.to(DTYPE) @ lower, full_matrices=False)
        rows = torch.linalg.solve(lower.T, vh.T)  # L⁻ᵀ v_i as columns
    n = ((test.to(DTYPE) @ rows) * rows).sum(0)
    return s.pow(2), n


def heldout_alone_error(terms: tuple[Tensor, Tensor], rank: int) -> float:
    """Σ_{i>r} σ_i² n_i: the held-out error of the layer fitted alone at rank ``rank``."""
    s2, n = terms
    return float((s2[rank:] * n[rank:]).sum())


def heldout_pair_error(terms: tuple[Tensor, Tensor], rank: int) -> float:
    """Σ_{i>2r} σ_i² n_i: the held-out error of the pair fitted at correction rank ``rank``."""
    s2, n = terms
    return float((s2[2 * rank:] * n[2 * rank:]).sum())


def heldout_error(weights: Mapping[str, Tensor], fitted: Mapping[str, Tensor], covs: Mapping[str, Tensor]) -> float:
    """Σ_ℓ tr(δ_ℓ B_ℓ δ_ℓᵀ), δ_ℓ = fitted_ℓ − W_ℓ, under covariances B (undamped): any plan's error
    under covariances it was not fitted on."""
    total = 0.0
    for name, w in weights.items():
        delta = fitted[name].to(DTYPE) - w.to(DTYPE)
        total += float(((delta @ covs[name].to(DTYPE)) * delta).sum())
    return total


def halves(data: Calibration) -> tuple[Calibration, Calibration]:
    """The calibration samples split in two, alternating over all samples in order (so batches of
    one sample split too).

    Raises:
        DataError: fewer than two samples.
    """
    if data.num_samples < 2:
        raise DataError("choosing the relaxed shrinkage by cross-fitting needs at least two calibration samples")
    parts: tuple[list, list] = ([], [])
    start = 0
    for batch, size in zip(data.batches, data.sizes, strict=True):
        for k, part in enumerate(parts):
            first = (k - start) % 2  # the first row of this batch whose overall index has parity k
            if first < size:
                part.append({key: v[first::2] for key, v in batch.items()})
        start += size
    return Calibration(parts[0]), Calibration(parts[1])


def fold_moments(model: nn.Module, data: Calibration,
                 names: Sequence[str]) -> tuple[dict[str, SecondMoments], dict[str, SecondMoments]]:
    """Each half's input moments of ``names`` (two forward passes over half the data each)."""
    first, second = halves(data)
    return input_moments(model, first, names), input_moments(model, second, names)


def consecutive_pairs(layers: Sequence[LayerInfo], names: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """Family -> its layers among ``names`` paired by index, (0, 1), (2, 3), ...: the pairs whose
    cross-fitted errors choose the family's shrinkage."""
    wanted = set(names)
    by_family: dict[str, list[str]] = {}
    for x in sorted(layers, key=lambda x: x.index):
        if x.name in wanted:
            by_family.setdefault(x.family, []).append(x.name)
    return {f: [(m[i], m[i + 1]) for i in range(0, len(m) - 1, 2)] for f, m in by_family.items()}


def choose_intensities(
    weights: Mapping[str, Tensor],
    folds: tuple[Mapping[str, Tensor], Mapping[str, Tensor]],
    pairs: Mapping[str, Sequence[tuple[str, str]]],
    ranks: Mapping[str, int],
    *,
    intensities: Sequence[float],
    damping: float = 0.01,
) -> dict[str, tuple[float, dict[float, float]]]:
    """Family -> (the intensity ρ with the least cross-fitted error, ρ -> that error).

    For each ρ, every pair of the family is fitted on one fold's covariances shrunk by ρ (and
    damped) and scored under the other fold's raw covariances at the family's rank, both ways. A
    family without a pair keeps ρ = 0 (nothing to choose by). ``folds`` are the two halves'
    covariances (scaled as the whitening is, so errors add across layers like the costs).
    """
    out: dict[str, tuple[float, dict[float, float]]] = {}
    for fam, members in pairs.items():
        if not members:
            out[fam] = (0.0, {})
            continue
        errors: dict[float, float] = {}
        for rho in intensities:
            total = 0.0
            for fit, test in (folds, folds[::-1]):
                for a, b in members:
                    terms = heldout_pair_terms(weights[a], weights[b], shrink(fit[a].to(DTYPE), rho),
                                               shrink(fit[b].to(DTYPE), rho), test[a], test[b], damping=damping)
                    total += heldout_pair_error(terms, ranks[fam])
            errors[rho] = total
        out[fam] = (min(errors, key=errors.__getitem__), errors)
    return out


def choose_alone_intensities(
    weights: Mapping[str, Tensor],
    folds: tuple[Mapping[str, Tensor], Mapping[str, Tensor]],
    members: Mapping[str, Sequence[str]],
    *,
    intensities: Sequence[float],
    damping: float = 0.01,
) -> dict[str, tuple[float, dict[float, float]]]:
    """Family -> (the intensity with the least cross-fitted error of its layers fitted alone, ρ ->
    that error), the errors summed over the ranks of ``ALONE_SHARES`` and both ways over the folds."""
    out: dict[str, tuple[float, dict[float, float]]] = {}
    for fam, names in members.items():
        errors: dict[float, float] = {}
        for rho in intensities:
            total = 0.0
            for fit, test in (folds, folds[::-1]):
                for name in names:
                    w = weights[name]
                    terms = heldout_alone_terms(w, shrink(fit[name].to(DTYPE), rho), test[name], damping=damping)
                    total += sum(heldout_alone_error(terms, max(1, round(share * min(w.shape))))
                                 for share in ALONE_SHARES)
            errors[rho] = total
        out[fam] = (min(errors, key=errors.__getitem__), errors) if errors else (0.0, {})
    return out


def full_data_intensity(rho: float, fold_units: float, units: float) -> float:
    """The intensity for all ``units`` samples equivalent to ``rho`` chosen on folds of ``fold_units``:
    on the ridge scale λ = ρ/(1 − ρ) (Ĝ ∝ G + λμI) the shrinkage a covariance estimate needs falls
    as 1/U (Ledoit–Wolf's β̄² ∝ 1/U), so λ is scaled by fold_units/units (½ for halves)."""
    if rho <= 0.0 or units <= 0:
        return max(rho, 0.0)
    ridge = rho / (1.0 - rho) * min(1.0, fold_units / units)
    return ridge / (1.0 + ridge)


@dataclass
class CrossFitted:
    """The whitening covariances (name -> s_ℓ·shrink(G_ℓ, ρ_f)), each family's applied intensity ρ_f,
    and the cross-fitted error of every intensity tried on the halves (family -> (argmin, ρ -> error));
    the same for the layers fitted alone (``alone_*``, chosen by ``choose_alone_intensities``)."""

    covs: dict[str, Tensor]
    intensity: dict[str, float]
    folds: dict[str, tuple[float, dict[float, float]]]
    alone_covs: dict[str, Tensor] = field(default_factory=dict)
    alone_intensity: dict[str, float] = field(default_factory=dict)
    alone_folds: dict[str, tuple[float, dict[float, float]]] = field(default_factory=dict)

    def whitening(self) -> dict[str, Tensor]:
        """Name -> covariance, and ``alone_key(name)`` -> a layer alone's where it differs: the
        whitening state every relaxed step reads (costs.alone_cov)."""
        return {**self.covs, **{alone_key(n): c for n, c in self.alone_covs.items() if c is not self.covs.get(n)}}


def cross_fitted_covariances(model: nn.Module, data: Calibration, names: Sequence[str], config: AnalyzeConfig, *,
                             progress: bool = False) -> CrossFitted:
    """The relaxed whitening with each family's shrinkage chosen by cross-fitting (module docstring):
    ``config.relaxed.shrinkage`` are the intensities tried on the halves, the pairs are each family's
    consecutive layers among ``names`` at the family's correction rank (``config.relaxed``: rank or
    rank_ratio; the budget's lowering is not applied, so analysis, measuring and apply choose
    alike), and the half-data choice is carried to all the data by ``full_data_intensity``. Output
    scales (``config.relaxed.output_weighting``) are fitted once on all of ``data`` and weigh both
    folds, so the held-out errors are on the costs' scale. ``config.shrinkage`` does not apply.

    With one calibration sample there is nothing to hold out: no shrinkage.

    Raises:
        BackendError: a name is not a linear layer's weight.
    """
    options = config.relaxed
    names = list(names)
    found = {x.name: x for x in discover_layers(model, config.targets, config.ignore, config.families)}
    # a layer discovery does not list is its own family (no pair: ρ = 0)
    layers = [found.get(n) or LayerInfo(name=n, family=n, index=i, shape=()) for i, n in enumerate(names)]
    moments = input_moments(model, data, names, progress=progress)
    raw = {n: m.covariance for n, m in moments.items()}
    scales = (layer_output_scales(model, data, names, raw, config) if options.output_weighting
              else dict.fromkeys(names, 1.0))
    if data.num_samples < 2:  # nothing to hold out: the sample covariance, unshrunk
        fams = {x.family for x in layers}
        return CrossFitted({n: raw[n] * scales[n] for n in names}, dict.fromkeys(fams, 0.0),
                           {f: (0.0, {}) for f in fams})
    first, second = fold_moments(model, data, names)
    folds = ({n: m.covariance * scales[n] for n, m in first.items()},
             {n: m.covariance * scales[n] for n, m in second.items()})
    weights = dense_weights(model, names)
    shapes = {n: (int(w.shape[0]), int(w.shape[1])) for n, w in weights.items()}
    ranks = family_ranks(layers, shapes, options)
    chosen = choose_intensities(weights, folds, consecutive_pairs(layers, names), ranks,
                                intensities=options.shrinkage, damping=options.damping)
    family = {x.name: x.family for x in layers}
    members: dict[str, list[str]] = {}
    for n in names:
        members.setdefault(family[n], []).append(n)
    chosen_alone = choose_alone_intensities(weights, folds, members, intensities=options.shrinkage,
                                            damping=options.damping)
    units = {n: (moments[n].units, 0.5 * (first[n].units + second[n].units)) for n in names}
    intensity: dict[str, float] = {}
    alone: dict[str, float] = {}
    for n in names:  # the units are the samples, alike for every layer of a family
        fold_units, all_units = units[n][1], units[n][0]
        intensity.setdefault(family[n], full_data_intensity(chosen.get(family[n], (0.0, {}))[0], fold_units, all_units))
        alone.setdefault(family[n], full_data_intensity(chosen_alone[family[n]][0], fold_units, all_units))
    covs = {n: shrink(raw[n], intensity[family[n]]) * scales[n] for n in names}
    alone_covs = {n: covs[n] if alone[family[n]] == intensity[family[n]] else shrink(raw[n], alone[family[n]]) * scales[n]
                  for n in names}
    return CrossFitted(covs, intensity, chosen, alone_covs, alone, chosen_alone)
