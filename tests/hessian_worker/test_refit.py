"""compress under the factored schemes fits the chosen plan again on every sample not held out
(``CompressConfig.refit``): the installed weights are the fit on those samples, not on the
curvature part the candidates were fitted with; with refit off, the fit the choice measured."""

from __future__ import annotations

import pytest
import torch
from hw_cases import TinyMLP

from hessian_worker.data import load_calibration
from hessian_worker.options import CompressConfig, DType
from hessian_worker.pipeline import compress, split_holdout
from hessian_worker.schemes import scheme_for
from solver.schema import Scheme


def _model() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP(width=8, depth=4).double().eval()


def _inputs() -> torch.Tensor:
    return torch.randn(64, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _installed(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("blocks.")}


def _apply_with(scheme: Scheme, config: CompressConfig, report, samples: str) -> dict[str, torch.Tensor]:
    """The chosen plan applied to a fresh model with the scheme's state on ``samples``: 'all' (every
    sample not held out) or 'costs' (the curvature part)."""
    model = _model()
    calib = load_calibration(_inputs(), batch_size=config.batch_size, seed=config.seed)
    fit, _ = split_holdout(calib, config)
    acfg = config.analyze_config(DType.float32, scheme=scheme)  # as compress does
    quiet = acfg.model_copy(update={"progress": False})
    sch = scheme_for(scheme)
    data = fit if samples == "all" else sch.parts(fit, config).costs
    state = sch.state(model, data, report.problem, quiet)
    sch.apply(model, report.plan, report.problem, report.merge, data=data, config=quiet, state=state)
    return _installed(model)


@pytest.mark.parametrize("scheme", [Scheme.basis, Scheme.relaxed])
def test_the_chosen_plan_is_fitted_on_every_sample_not_held_out(scheme: Scheme) -> None:
    common = {"ratio": 0.75, "scheme": scheme, "top": 2, "normalized_top": 1, "per_pattern": 1, "device": "cpu",
              "progress": False, "merge": "mean"}
    if scheme is Scheme.basis:
        common["rank"] = 2
    installed = {}
    for refit in (True, False):
        config = CompressConfig(**common, refit=refit)
        model = _model()
        report = compress(model, _inputs(), config)
        assert report.scheme is scheme
        installed[refit] = _installed(model)
        want = _apply_with(scheme, config, report, "all" if refit else "costs")
        assert installed[refit].keys() == want.keys()
        for name, value in want.items():
            torch.testing.assert_close(installed[refit][name], value, rtol=1e-10, atol=1e-12, msg=name)
    # the two fits differ: the test would notice an apply that ignored the refit
    assert any(not torch.allclose(installed[True][k], installed[False][k]) for k in installed[True])
