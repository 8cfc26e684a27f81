"""compress --scheme auto: every scheme at the same ratio on the same samples, the least measured
loss installed; the second-order predictions and their Spearman; the CLI flag."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from hw_cases import TinyMLP, rank_one_mlp

from geoshare.cli import main
from hessian_worker.basis.modules import BasisLinear
from hessian_worker.measure import measure_and_predict, measure_loss
from hessian_worker.options import CompressConfig
from hessian_worker.pipeline import common_parts, compress, schemes_of
from hessian_worker.ranking import average_ranks, spearman
from hessian_worker.schemes import SCHEMES
from hessian_worker.tying import unique_params
from solver.schema import Scheme


def _inputs(n: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def identical_mlp() -> TinyMLP:
    """Four equal 4x4 layers: tying them loses nothing, a low-rank basis does."""
    torch.manual_seed(0)
    model = TinyMLP(depth=4).double().eval()
    with torch.no_grad():
        for block in model.blocks[1:]:
            block.fc.weight.copy_(model.blocks[0].fc.weight)
            block.fc.bias.copy_(model.blocks[0].fc.bias)
    return model


@pytest.mark.parametrize(("make", "winner"), [(identical_mlp, Scheme.tie), (rank_one_mlp, Scheme.basis)])
def test_auto_installs_the_scheme_whose_candidate_loses_least(make, winner) -> None:
    model = make()
    reference = copy.deepcopy(model)
    # the mean merge: the layerwise merge's ridge pulls even equal weights toward 0
    config = CompressConfig(ratio=0.5, scheme="auto", rank=1, top=4, merge="mean", device="cpu", progress=False)
    report = compress(model, _inputs(), config)
    assert report.scheme is winner
    # every scheme ran; one that cannot reach the ratio here (relaxed: one 4x4 class plus four
    # rank-1 corrections keep 48 of 64 weights) has no candidate and says why
    assert [s.scheme for s in report.schemes] == list(SCHEMES)
    assert all(s.candidates > 0 or s.note for s in report.schemes)
    assert {c.scheme for c in report.candidates} >= {Scheme.tie, Scheme.basis}
    chosen = min(report.candidates, key=lambda c: c.measured)
    assert chosen.scheme is winner and report.chosen == chosen.strategy
    loser = Scheme.basis if winner is Scheme.tie else Scheme.tie
    assert chosen.measured < 1e-9 < min(c.measured for c in report.candidates if c.scheme is loser)
    # the installed model keeps what the plan says (of the 4·16 shareable weights)
    assert report.params_ratio <= 0.5
    assert unique_params(reference) - unique_params(model) == 64 - report.plan.params.shared
    assert isinstance(model.blocks[0].fc, BasisLinear) is (winner is Scheme.basis)
    assert [s.scheme for s in report.schemes] == list(SCHEMES)
    assert report.measured_loss_change < 1e-9
    if winner is Scheme.basis:  # each layer alone at rank 1 (8 weights) spends the budget exactly
        assert report.params_ratio == 0.5 and report.schemes[list(SCHEMES).index(winner)].note is None


def test_auto_scores_every_scheme_on_samples_none_was_fitted_on() -> None:
    from hw_cases import mlp_data

    fit = mlp_data(n=10)
    parts = common_parts(fit, CompressConfig(ratio=0.5, scheme="auto"))
    fitted = {tuple(r.tolist()) for r in parts.costs.rows()["input"]}
    scored = {tuple(r.tolist()) for r in parts.choice.rows()["input"]}
    assert len(fitted) == len(scored) == 5 and not fitted & scored
    assert schemes_of(CompressConfig(ratio=0.5, scheme="auto")) == list(SCHEMES.values())
    assert schemes_of(CompressConfig(ratio=0.5, scheme="basis")) == [SCHEMES[Scheme.basis]]


def test_second_order_prediction_is_the_quadratic_model_of_the_loss() -> None:
    """For a small perturbation the prediction matches the measured loss change to second order,
    for a tied and for a basis candidate alike (one scale)."""
    model = rank_one_mlp()
    with torch.no_grad():  # nearly equal layers: tying them is a small perturbation
        for block in model.blocks[1:]:
            block.fc.weight.copy_(model.blocks[0].fc.weight + 1e-3 * block.fc.weight)
    x = _inputs(16)
    (measured, predicted), = measure_and_predict(model, x, [[["blocks.0.fc.weight", "blocks.1.fc.weight"]]])
    assert predicted == pytest.approx(measured, rel=1e-2) and measured > 0
    # no change, no loss and no prediction
    assert measure_and_predict(model, x, [[]]) == [(0.0, 0.0)]


def test_report_spearman_is_over_every_candidate() -> None:
    model = rank_one_mlp()
    report = compress(model, _inputs(), CompressConfig(ratio=0.5, scheme="auto", rank=1, top=4, device="cpu",
                                                      progress=False, predict=True))
    pairs = [(c.second_order, c.measured) for c in report.candidates]
    assert all(p is not None for p, _ in pairs)
    assert report.spearman == spearman([p for p, _ in pairs], [m for _, m in pairs])
    quiet = compress(rank_one_mlp(), _inputs(), CompressConfig(ratio=0.5, scheme="basis", rank=1, top=4,
                                                               device="cpu", progress=False))
    assert quiet.spearman is None and all(c.second_order is None for c in quiet.candidates)


def _spearman_by_definition(x: list[float], y: list[float]) -> float:
    """Brute force: ranks by counting (ties averaged), then Pearson of the ranks."""

    def ranks(v: list[float]) -> list[float]:
        return [sum(w < a for w in v) + (sum(w == a for w in v) - 1) / 2 for a in v]

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def test_spearman_against_its_definition() -> None:
    g = torch.Generator().manual_seed(0)
    for n in (3, 5, 8):
        x = torch.randint(0, 4, (n,), generator=g).double().tolist()  # ties
        y = torch.randn(n, generator=g, dtype=torch.float64).tolist()
        if len(set(x)) > 1:
            assert spearman(x, y) == pytest.approx(_spearman_by_definition(x, y), abs=1e-12)
    for perm in itertools.permutations(range(4)):  # no ties: 1 − 6Σd²/(n(n²−1))
        d2 = sum((i - p) ** 2 for i, p in enumerate(perm))
        assert spearman(list(range(4)), list(perm)) == pytest.approx(1 - 6 * d2 / (4 * 15), abs=1e-12)
    assert average_ranks([2.0, 1.0, 2.0]).tolist() == [1.5, 0.0, 1.5]
    assert spearman([1.0], [2.0]) is None and spearman([1.0, 1.0], [1.0, 2.0]) is None
    with pytest.raises(ValueError, match="pairs"):
        spearman([1.0, 2.0], [1.0])


def test_cli_scheme_auto(tmp_path, capsys) -> None:
    data = tmp_path / "calib.pt"
    torch.save(_inputs(32, seed=0), data)
    common = ["--model", "hw_cases:factory", "--data", str(data), "--dtype", "float64", "--device", "cpu", "--quiet"]
    out = tmp_path / "out"
    assert main(["compress", *common, "--ratio", "0.6", "--scheme", "auto", "--rank-ratio", "0.25", "--top", "2",
                 "--predict", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["scheme"] in {s.value for s in SCHEMES}
    assert [s["scheme"] for s in report["schemes"]] == [s.value for s in SCHEMES]
    ran = {s["scheme"] for s in report["schemes"] if s["candidates"]}
    assert {c["scheme"] for c in report["candidates"]} == ran >= {"tie", "basis"}
    assert report["spearman"] is not None
    with pytest.raises(SystemExit):  # analyze has no auto: it computes one scheme's costs
        main(["analyze", *common, "--scheme", "auto", "-o", str(tmp_path / "p.json")])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    assert "auto" in capsys.readouterr().out


def test_measured_loss_is_the_installed_models() -> None:
    """The held-out figure of an auto run is the installed model's loss against the original."""
    model = rank_one_mlp()
    reference = copy.deepcopy(model)
    x = _inputs()
    report = compress(model, x, CompressConfig(ratio=0.5, scheme="auto", rank=1, top=2, device="cpu",
                                               progress=False, holdout=12))
    held = CompressConfig(ratio=0.5, holdout=12)
    from hessian_worker.data import load_calibration
    from hessian_worker.pipeline import split_holdout

    _, held_data = split_holdout(load_calibration(x, batch_size=8, seed=0), held)
    assert report.measured_loss_change == pytest.approx(measure_loss(model, reference, held_data), abs=1e-12)
