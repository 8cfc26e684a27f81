"""shrinkage='held-out': the layerwise merge's intensity chosen by the loss on held-out samples.

A model whose loss is exactly the tied layers' output error makes the choice checkable in closed
form: scored on the samples the covariances came from, the unshrunk merge is the least-squares
optimum, so ρ = 0 must win; fitted on inputs that never visit some directions and scored on inputs
that do, shrinkage must win."""

from __future__ import annotations

import copy

import pytest
import torch
from hw_cases import tiny_mlp
from torch import nn

from hessian_worker.apply import apply_plan
from hessian_worker.config import AnalyzeConfig
from hessian_worker.curvature.layerwise import LayerwiseCurvature, layerwise_merge
from hessian_worker.curvature.shrinkage import shrink
from hessian_worker.data import Calibration, load_calibration
from hessian_worker.intensity_choice import INTENSITIES, choose_intensity, with_intensity
from hessian_worker.measure import measure_plans
from hessian_worker.options import Shrinkage
from hessian_worker.pipeline import (
    CompressConfig,
    choice_parts,
    compress,
    merge_covariances,
    split_holdout,
)

NAMES = ["a.weight", "b.weight"]
CPU = AnalyzeConfig(device="cpu", progress=False, distill="mse", layerwise_damping=0.0, dtype="float64")


SCALE = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64)


class TwoHeads(nn.Module):
    """y = [W_a x, W_b Dx] (D diagonal, so the two inputs' covariances differ and the merge is not the
    mean): tying a and b costs exactly ‖(W − W_a) x‖² + ‖(W − W_b) Dx‖² under the MSE distill loss."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 3, bias=False)
        self.b = nn.Linear(5, 3, bias=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the batch key
        return torch.cat([self.a(input), self.b(input * SCALE.to(input.dtype))], dim=-1)


def _model() -> TwoHeads:
    torch.manual_seed(0)
    return TwoHeads().double().eval()


def _inputs(n: int, seed: int, visited: int = 5) -> Calibration:
    """n rows, correlated, the coordinates after the first ``visited`` scaled down 1000-fold."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(5, 5, generator=g, dtype=torch.float64)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64) @ mix
    x[:, visited:] *= 1e-3
    return Calibration([{"input": x[i : i + 8]} for i in range(0, n, 8)])


def test_with_intensity_shrinks_a_copy_and_refuses_shrunk_covariances() -> None:
    model, data = _model(), _inputs(40, 1)
    plain = LayerwiseCurvature.collect(model, data, NAMES)
    before = {n: g.clone() for n, g in plain.cov.items()}
    half = with_intensity(plain, 0.3)
    for n in NAMES:
        g = before[n]
        expected = 0.7 * g + 0.3 * (g.trace() / 5) * torch.eye(5, dtype=torch.float64)
        torch.testing.assert_close(half.cov[n], expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(plain.cov[n], g)  # the originals untouched
    assert half.intensities == {n: 0.3 for n in NAMES} and half.transposed == plain.transposed
    with pytest.raises(ValueError, match="already shrunk"):
        with_intensity(half, 0.1)
    with pytest.raises(ValueError, match="outside"):
        with_intensity(plain, 1.5)


def test_held_out_setting_leaves_covariances_unshrunk_where_nothing_is_measured() -> None:
    model, data = _model(), _inputs(40, 1)
    held = LayerwiseCurvature.collect(model, data, NAMES, shrinkage=Shrinkage.held_out)
    plain = LayerwiseCurvature.collect(model, data, NAMES)
    for n in NAMES:
        torch.testing.assert_close(held.cov[n], plain.cov[n])
    assert all(r == 0.0 for r in held.intensities.values())


def _error(model: TwoHeads, merged: torch.Tensor, data: Calibration) -> float:
    """‖(W − W_a) x‖² + ‖(W − W_b) Dx‖² over the rows, / (rows · outputs): the MSE distill loss of the tie."""
    x = torch.cat([b["input"] for b in data.batches])
    err = sum(((inp @ (merged - w.detach()).T) ** 2).sum()
              for inp, w in ((x, model.a.weight), (x * SCALE, model.b.weight)))
    return float(err) / (x.shape[0] * 6)


def test_losses_are_the_closed_form_output_errors_and_the_least_wins() -> None:
    model, fit, score = _model(), _inputs(48, 1), _inputs(48, 2)
    plain = LayerwiseCurvature.collect(model, fit, NAMES)
    choice = choose_intensity(model, score, [NAMES], plain, CPU)
    assert list(choice.losses) == list(INTENSITIES)
    for rho, loss in choice.losses.items():
        merged = layerwise_merge([model.a.weight.detach(), model.b.weight.detach()],
                                 [shrink(plain.cov[n].clone(), rho) for n in NAMES], damping=0.0)
        assert loss == pytest.approx(_error(model, merged, score), rel=1e-9)
    assert choice.intensity == min(choice.losses, key=lambda r: (choice.losses[r], r))


def test_scored_where_fitted_the_unshrunk_merge_wins() -> None:
    model, data = _model(), _inputs(48, 1)
    choice = choose_intensity(model, data, [NAMES], LayerwiseCurvature.collect(model, data, NAMES), CPU)
    assert choice.intensity == 0.0
    assert all(choice.losses[0.0] < v for r, v in choice.losses.items() if r > 0)


def test_fitted_on_a_subspace_and_scored_off_it_shrinkage_wins() -> None:
    model = _model()
    fit = _inputs(48, 1, visited=3)  # the last two inputs barely move while fitting
    choice = choose_intensity(model, _inputs(48, 2), [NAMES], LayerwiseCurvature.collect(model, fit, NAMES), CPU)
    assert choice.intensity > 0.0
    assert choice.losses[choice.intensity] < 0.9 * choice.losses[0.0]


def test_choice_refuses_an_empty_grid() -> None:
    model, data = _model(), _inputs(16, 1)
    with pytest.raises(ValueError, match="at least one"):
        choose_intensity(model, data, [NAMES], LayerwiseCurvature.collect(model, data, NAMES), CPU, grid=())


@pytest.mark.parametrize("setting", [Shrinkage.held_out, Shrinkage.none])
def test_compress_installs_the_merge_at_the_intensity_of_least_held_out_loss(setting: Shrinkage) -> None:
    reference = tiny_mlp().double()
    model = copy.deepcopy(reference)
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    config = CompressConfig(ratio=0.7, device="cpu", progress=False, shrinkage=setting)
    report = compress(model, x, config)
    assert report.merge.value == "layerwise"
    if setting is Shrinkage.none:
        assert report.shrinkage_intensity is None and report.shrinkage_losses is None
        return
    fit, _ = split_holdout(load_calibration(x, batch_size=config.batch_size, seed=config.seed), config)
    merge_part, score_part = choice_parts(fit, config)
    cpu = AnalyzeConfig(device="cpu", progress=False)
    names = [layer.name for layer in report.problem.layers]
    fitted = merge_covariances(reference, merge_part, names, cpu, None)
    expected = {f"{r:g}": measure_plans(reference, score_part, [report.plan], cpu, merge="layerwise",
                                        layerwise=with_intensity(fitted, r))[0] for r in INTENSITIES}
    assert report.shrinkage_losses == pytest.approx(expected, rel=1e-9, abs=1e-15)
    rho = report.shrinkage_intensity
    assert rho == min(INTENSITIES, key=lambda r: (expected[f"{r:g}"], r))
    assert 0.0 < rho < max(INTENSITIES)  # on these samples an inner one, so the check below tells them apart
    # installed: the chosen plan merged with every choice sample's covariances, shrunk by that ρ
    final = copy.deepcopy(reference)
    apply_plan(final, report.plan, "layerwise", data=fit, config=cpu,
               layerwise=with_intensity(merge_covariances(reference, fit, names, cpu, None), rho))
    for name, value in final.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value)


def test_held_out_is_compress_default_and_a_cli_value() -> None:
    from geoshare.cli.model_flags import shrinkage_setting

    assert CompressConfig(ratio=0.5).shrinkage is Shrinkage.held_out
    assert AnalyzeConfig().shrinkage is Shrinkage.none  # analyze measures nothing to choose with
    assert CompressConfig(ratio=0.5).analyze_config("float32").shrinkage is Shrinkage.held_out
    assert shrinkage_setting("held-out") is Shrinkage.held_out
