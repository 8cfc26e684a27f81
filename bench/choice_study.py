"""Does measuring candidates pick the plan that is best on the metric? (MiniLM)

For each budget, every candidate (the exact-cost optimum and the patterns) is measured three
ways: distillation-loss change on the 16 calibration sentences the costs came from, on 128 other
validation sentences, and the held-out embedding cosine that evaluate.py reports.

    python bench/choice_study.py     -> bench/results/choice_study.md
"""

from __future__ import annotations

import copy
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.corpus import sentences, split
from bench.evaluate import CACHE, costs_for, embed
from hessian_worker import AnalyzeConfig, apply_plan, load_model, measure_plans
from solver import SolveConfig
from solver.candidates import candidate_plans

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    import bench.evaluate as ev

    loaded = load_model("minilm")
    model, tok = loaded.model.float().eval(), loaded.tokenizer
    ev.TOKENIZER = tok
    calib, held = split(16, 64, 0)
    pool = list(sentences())
    random.Random(0).shuffle(pool)
    validation = pool[80:208]  # disjoint from both: split() takes the first 80 of the same order
    ref = embed(model, tok, held)
    problem = costs_for("exact", model, calib, 16, 0, "mse")
    cfg = AnalyzeConfig(progress=False)
    lines = ["# Measured choice: calibration loss vs validation loss vs held-out cosine (MiniLM)", "",
             f"Command: `python {' '.join(sys.argv)}`; costs cached in {CACHE.name}/", "",
             "| budget | candidate | predicted | loss (16 calib) | loss (128 validation) | held-out cosine |", "|---|---|---|---|---|---|"]
    for ratio in (0.9, 0.8, 0.67, 0.5):
        cands = candidate_plans(problem, SolveConfig(max_params_ratio=ratio))
        on_calib = measure_plans(model, calib, cands, cfg, tokenizer=tok)
        on_val = measure_plans(model, validation, cands, cfg, tokenizer=tok)
        for plan, a, b in zip(cands, on_calib, on_val, strict=True):
            tied = copy.deepcopy(model)
            apply_plan(tied, plan, "mean")
            cosine = float((embed(tied, tok, held) * ref).sum(-1).mean())
            lines.append(f"| {ratio} | {plan.strategy or 'optimum'} | {plan.objective:.4f} | {a:.4f} | {b:.4f} | {cosine:.3f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "choice_study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
