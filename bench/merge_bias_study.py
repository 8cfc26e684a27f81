"""Is the measured choice biased by scoring candidates on the data the layerwise merge was fitted on? (MiniLM)

The layerwise merge (ΣW_kG_k)(ΣG_k)⁻¹ is fitted on input covariances; the measured choice scores
every candidate's loss after that merge. Fitted and scored on the same sentences (in sample), plans
that the fit flatters win. This measures the whole candidate pool at one budget both ways, in
sample (merge and score on calibration + validation / validation) and out of sample (merge on
calibration + the first half of validation, score on the second half), and reports each way's
Spearman against the evaluation split and the evaluation loss of its pick, tied with the
all-data covariances as the final model is.

    python bench/merge_bias_study.py [--ratio 0.84]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from bench.evaluate import costs_for, union
from bench.tasks import load_task
from hessian_worker import AnalyzeConfig
from hessian_worker.curvature.layerwise import LayerwiseCurvature
from hessian_worker.measure import measure_plans
from hessian_worker.prepare import prepare
from hessian_worker.ranking import spearman
from solver import SolveConfig
from solver.candidates import candidate_plans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratio", type=float, default=0.84)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = load_task("minilm", quick=False, seed=0)
    problem = costs_for(task, "exact", 0)
    names = [layer.name for layer in problem.layers]
    quiet = AnalyzeConfig(distill=task.distill, progress=False)
    half = len(task.validation) // 2

    def covariances(data: list[str]) -> LayerwiseCurvature:
        prep = prepare(task.model, data, quiet, tokenizer=task.tokenizer)
        return LayerwiseCurvature.collect(prep.model, prep.data, names)

    def losses(data: list[str], covs: LayerwiseCurvature) -> list[float]:
        return measure_plans(task.model, data, pool, quiet, merge="layerwise", tokenizer=task.tokenizer, layerwise=covs)

    pool = candidate_plans(problem, SolveConfig(max_params_ratio=args.ratio, time_limit_s=10, seed=0),
                           top=16, per_pattern=4, normalized_top=16)
    final = covariances(union(task.calibration, task.validation))
    evaluation = losses(task.evaluation, final)
    ways = {
        "in sample": (final, task.validation),
        "out of sample": (covariances(union(task.calibration, task.validation[:half])), task.validation[half:]),
    }
    print(f"MiniLM at {args.ratio}, {len(pool)} candidates; best evaluation loss {min(evaluation):.4f} "
          f"({pool[int(np.argmin(evaluation))].strategy})")
    for way, (covs, data) in ways.items():
        scores = losses(data, covs)
        pick = int(np.argmin(scores))
        print(f"{way}: Spearman(score, evaluation) {spearman(scores, evaluation):.3f}; pick {pool[pick].strategy}, "
              f"evaluation loss {evaluation[pick]:.4f}")


if __name__ == "__main__":
    main()
