"""The reduced evaluation (what CI runs): real MiniLM and digits, every strategy, the contract of eval.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_quick_evaluation_writes_the_promised_files(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "evaluate.py"), "--quick", "--jobs", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data) == {"minilm", "digits", "meta"}
    for name, task in data.items():
        if name == "meta":
            continue
        assert task["higher_is_better"] is True
        rows = task["results"]
        strategies = {r["strategy"] for r in rows}
        assert {"geo", "geo-solver", "sequence", "cycle", "cycle-rev", "adjacent-pairs", "random",
                "weight-distance", "sequence+geo-merge"} <= strategies
        for r in rows:
            assert set(r) >= {"ratio", "regime", "strategy", "measured", "loss", "predicted", "unique_params"}
            assert -1.0 <= r["measured"] <= 1.0 + 1e-6
            if r["strategy"] != "all-share":  # every strategy keeps no more than the budget allows
                assert r["params_ratio"] <= r["ratio"] + 1e-9
            if r["strategy"] == "geo":
                assert r["chosen"] and r["merge"] == task["merge"] in ("curvature", "layerwise")
        assert set(task["rank_agreement"]["spearman"]) == {"exact", "diagonal"}
        assert (tmp_path / f"eval-{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert out.with_suffix(".md").read_text().startswith("# Evaluation")
    assert len(data["meta"]["runs"]) == 4  # --jobs 2: one process per (task, budget), merged
