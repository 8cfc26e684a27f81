"""compress_checkpoint: a decoder LLM compressed from its checkpoint with one block in memory at a time.

The in-memory ``pipeline.compress`` chain, each stage streamed: the K-FAC statistics of the fit
samples (cached, so compressing again at another ratio needs no new pass) price the pairs; the
solver's candidates are measured by streamed forwards (``llm.measure``); the winner is tied with
the layerwise merge from the same statistics (``llm.merge``); the held-out figure is measured the
same way; the tied model is written tensor by tensor (``llm.save``). The samples play the same
parts as in memory: a quarter held out for the final figure; of the rest (all of which the costs
and the final merge use), ``choice_holdout`` scores the candidates, which are merged with the
statistics of the others (fit sums minus the scored samples' sums, collected on the reference pass
that scoring runs anyway). With whole input statistics (``kfac.rank=None``) and the same settings
this gives the in-memory pipeline's costs, candidates, choice and saved model.

With ``heal_steps``, the winner's classes are healed block by block from their merged values on the
fit samples (``llm.heal``: local distillation of each tied block) before the held-out figure and the
save. The in-memory path's heal-aware choice and ``heal_holdout`` do not apply: the zero-shot winner
is healed, and each block keeps its best step on its own data (classes shared with earlier blocks
anchored to their inputs there, sketched as the statistics are: ``kfac.rank``).

In a torch.distributed job (torchrun, or a process group initialized before the call) every rank
runs this on its share of the samples: the statistics as the analysis shards them (whole batches,
sums all-reduced, families priced across ranks), the solver's candidates found on rank 0 and
broadcast, each candidate's measured loss and the held-out figure as sums of the ranks' batches,
the merge from the all-reduced sums (the same on every rank), the healing data parallel over every
batch's rows with all-reduced gradients (``llm.heal``), and the model written by rank 0. Every
rank returns the same report; its problem's ``source`` records ``world_size`` and each rank's share.

What costs what, in forwards over the calibration samples: the statistics about one (plus a
backward over ``kfac.gradient_samples``), the reference over the scored samples and every
candidate from its first tied block on, one each at most over those samples, and two over the
held-out quarter.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hessian_worker.config import AnalyzeConfig, DType, torch_device
from hessian_worker.curvature.kfac import FactorStats, InputFactor, input_factor
from hessian_worker.data import Calibration, DataSource
from hessian_worker.distributed import Group, all_reduce_stats, broadcast, is_writer, join, step
from hessian_worker.errors import BackendError
from hessian_worker.llm.analyze import (
    Opened,
    analysis_estimate,
    check_memory,
    check_shardable,
    check_streamed_backend,
    factor_statistics,
    merge_costs,
    open_blocks,
    open_checkpoint,
    price,
    quiet_followers,
    streamed_problem,
    token_count,
)
from hessian_worker.llm.blocks import ModuleBlocks
from hessian_worker.llm.decoder import MemoryEstimate
from hessian_worker.llm.heal import heal_blockwise
from hessian_worker.llm.measure import (
    InputStatsSpec,
    MergedOf,
    plan_loss,
    plan_losses,
    reference_run,
)
from hessian_worker.llm.merge import check_merge, difference, merged_value
from hessian_worker.llm.save import save_streamed
from hessian_worker.merge import Merge
from hessian_worker.pipeline import (
    Candidate,
    CompressConfig,
    CompressReport,
    choice_parts,
    split_holdout,
)
from solver.candidates import candidate_plans
from solver.planning import SolveConfig
from solver.schema import Scheme


def compress_checkpoint(path: str | Path, data: DataSource | None, config: CompressConfig, out: str | Path, *,
                        memory_limit_gb: float | None = None, cache_dir: str | Path | None = None,
                        tokenizer: Any | None = None) -> CompressReport:
    """Compresses the decoder checkpoint at ``path`` to ``config.ratio`` of its shareable parameters
    and saves the tied model to ``out`` (model.safetensors + plan.json + the checkpoint's config.json and
    tokenizer: ``hessian_worker.load_compressed`` reads it).

    In a torch.distributed job (torchrun, or a process group initialized before the call) every
    rank calls this with the same arguments and gets the same report; rank 0 writes ``out``.

    Raises:
        BackendError: a setting the streamed path cannot honour (the message names the alternative).
        CheckpointError, MemoryBudgetError, DataError, BudgetInfeasible: with the fix in the message.
        DistributedError: another rank failed, or the ranks stopped answering within the timeout.
    """
    acfg = _check_supported(config)
    group = join(torch_device(acfg))
    config, acfg = _quiet(config, group), quiet_followers(acfg, group)
    with step(group, "opening the checkpoint"):
        opened = open_checkpoint(path, data, acfg, tokenizer=tokenizer)
    return compress_opened(opened, config, out, memory_limit_gb=memory_limit_gb, cache_dir=cache_dir,
                           source_model=str(Path(path)), group=group)


def compress_blocks(blocks: ModuleBlocks, data: DataSource, config: CompressConfig, out: str | Path, *,
                    tokenizer: Any | None = None) -> CompressReport:
    """The streamed compress of a model already in memory (``llm.blocks``; the model is not changed),
    block by block as for a checkpoint: checked against the in-memory pipeline on the same model."""
    acfg = _check_supported(config)
    group = join(blocks.device)
    config, acfg = _quiet(config, group), quiet_followers(acfg, group)
    with step(group, "reading the calibration data"):
        opened = open_blocks(blocks, data, acfg, tokenizer=tokenizer)
    return compress_opened(opened, config, out, group=group)


def compress_opened(opened: Opened, config: CompressConfig, out: str | Path, *, memory_limit_gb: float | None = None,
                    cache_dir: str | Path | None = None, source_model: str | None = None,
                    group: Group | None = None) -> CompressReport:
    """The streamed compress of an opened model (see the module docstring); ``group``: the
    torch.distributed job it is one rank of (None: this process alone).

    Raises:
        DistributedError: another rank failed, or the ranks stopped answering within the timeout.
    """
    acfg = _check_supported(config)
    merge = config.merge or Merge.layerwise
    fit, held = split_holdout(opened.calib, config)
    if group is not None and group.world_size > 1:
        check_shardable(fit, acfg, group)
    with step(group, "the memory check"):
        estimate = compress_estimate(opened, acfg, _share(fit, group), config.ratio) if opened.on_disk else None
        if estimate is not None:
            check_memory(estimate, memory_limit_gb, config.progress, what="streamed compress")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    token_inputs: dict[str, FactorStats] = {}
    stats, cached = factor_statistics(opened, fit, acfg, cache_dir, token_inputs=token_inputs, group=group)
    seconds["statistics"] = time.perf_counter() - clock
    with step(group, "pricing"):
        matrix, more = price(opened, stats, acfg, keep_stats=merge is Merge.layerwise, group=group)
    matrix = merge_costs(group, matrix)
    seconds.update(more)
    with step(group, "the candidate plans") as found:
        problem = streamed_problem(opened, matrix, acfg, estimate, cached, seconds, group, data=fit)
        if is_writer(group):  # the solver stops at a time limit: one rank finds the pool for all
            solve_config = SolveConfig(max_params_ratio=config.ratio, time_limit_s=config.time_limit_s,
                                       seed=config.seed)
            found.share = candidate_plans(problem, solve_config, top=config.top, min_distance=config.min_distance,
                                          per_pattern=config.per_pattern, normalized_top=config.normalized_top)
    pool = found.shared[0]
    problem = broadcast(group, problem)

    clock = time.perf_counter()
    layerwise = merge is Merge.layerwise
    # the layerwise merge is fitted to data: its candidates are scored on samples it was not fitted on
    score_part = choice_parts(fit, config)[1] if layerwise else None
    # the merge's covariances are per token: the costs' sums, unless those were pooled per sample
    inputs = token_inputs or stats
    spec = InputStatsSpec(opened.layers, config.kfac.rank, config.kfac.oversample, config.seed)
    scored = score_part or fit
    with step(group, "the reference pass of the choice"):
        reference, score_stats = reference_run(opened.decoder, scored, stats=spec if score_part is not None else None,
                                               batches=_batches(scored, group), progress=config.progress)
    all_reduce_stats(group, score_stats)
    scoring = {n: difference(inputs[n], score_stats[n]) for n in score_stats} if score_stats else inputs
    with step(group, "measuring the candidates") as losses:
        losses.share = plan_losses(opened.decoder, reference, [p.groups for p in pool],
                                   _merger(opened, merge, scoring, config), distill=config.distill,
                                   progress=config.progress)
    measured = _summed(losses.shared)
    del reference, scoring, score_stats
    index = min(range(len(pool)), key=lambda i: (measured[i], i))
    plan = pool[index]
    seconds["choice"] = time.perf_counter() - clock

    clock = time.perf_counter()
    final = _merger(opened, merge, inputs, config)
    healed = None
    if config.heal_steps:  # block-wise local distillation from the merged values, on the fit samples
        values, healed = heal_blockwise(opened.decoder, fit, plan.groups, final, steps=config.heal_steps,
                                        lr=config.heal_lr, seed=config.seed, rank=config.kfac.rank,
                                        oversample=config.kfac.oversample, progress=config.progress, group=group)
        final = values.__getitem__
        seconds["heal"] = time.perf_counter() - clock
        clock = time.perf_counter()
    held_change = None
    if held is not None:
        with step(group, "the held-out figure") as part:
            reference, _ = reference_run(opened.decoder, held, batches=_batches(held, group),
                                         progress=config.progress)
            part.share = [plan_loss(opened.decoder, reference, plan.groups, final, distill=config.distill)]
            del reference
        held_change = _summed(part.shared)[0]
    seconds["held_out"] = time.perf_counter() - clock
    clock = time.perf_counter()
    with step(group, "saving the model") as saved:
        if is_writer(group):
            saved.share = save_streamed(opened.decoder, plan, final, out,
                                        extra={"source_model": source_model} if source_model is not None else None,
                                        source=source_model)
    unique = saved.shared[0]
    seconds["save"] = time.perf_counter() - clock
    source = {**(problem.source or {}), "seconds": {k: round(v, 3) for k, v in seconds.items()}}
    if healed is not None:
        source["heal"] = healed.summary()
    report = CompressReport(
        plan=plan,
        chosen=plan.strategy or "optimum",
        merge=merge,
        candidates=[Candidate(strategy=p.strategy or "optimum", predicted=p.objective, measured=m,
                              params_ratio=p.params.ratio if p.params else 1.0)
                    for p, m in zip(pool, measured, strict=True)],
        problem=problem.model_copy(update={"source": source}),
        unique_params=unique,
        params_ratio=plan.params.ratio if plan.params else 1.0,
        predicted_loss_change=plan.objective,
        measured_loss_change=held_change,
    )
    return broadcast(group, report)  # rank 0's timings on every rank: one report for the job


def _batches(data: Calibration, group: Group | None) -> list[int] | None:
    """The batches of ``data`` this rank runs (None: all, in a lone process)."""
    return None if group is None else group.batches(len(data.batches))


def _share(data: Calibration, group: Group | None) -> Calibration:
    """This rank's batches of ``data`` (all of them alone; at least one, for an estimate)."""
    own = _batches(data, group)
    return data if own is None else Calibration([data.batches[b] for b in own] or data.batches[:1])


def _summed(parts: list[list[float]]) -> list[float]:
    """Every rank's partial losses added up in rank order (the same floats on every rank)."""
    return [sum(p[i] for p in parts) for i in range(len(parts[0]))]


def _quiet(config: CompressConfig, group: Group | None) -> CompressConfig:
    """Progress bars on rank 0 only (the ranks move in step)."""
    return config if is_writer(group) else config.model_copy(update={"progress": False})


def compress_estimate(opened: Opened, config: AnalyzeConfig, fit: Calibration, ratio: float) -> MemoryEstimate:
    """The analysis's peak plus what the choice and the tie hold on top: the sums kept beside the
    factors (the merge reads them), the reference's input to every block, the merged classes alive
    in one candidate (at most the parameters the plan gives up: each class of m layers saves m − 1)
    and one class's merge in float32."""
    base = analysis_estimate(opened, config, fit)
    size = torch.empty((), dtype=opened.dtype).element_size()
    hidden = int(opened.checkpoint.config["hidden_size"])
    kept = opened.decoder.num_blocks * token_count(fit) * hidden * size
    shareable = sum(x.params for x in opened.layers)
    live = int((1.0 - ratio) * shareable) * size
    widest = max(x.params for x in opened.layers)
    return dataclasses.replace(base, choice=base.statistics + kept + live + 4 * widest * 4)


def _check_supported(config: CompressConfig) -> AnalyzeConfig:
    """The analysis settings of a streamed compress; raises BackendError for a setting it does not
    have (yet), naming the way out, before any work."""
    if config.scheme is not Scheme.tie:
        raise BackendError("a streamed decoder is compressed with scheme='tie'; shared bases need the whole model "
                           "in memory (use a model that fits, or --scheme tie)")
    if config.curvature_samples is not None:
        raise BackendError("a streamed decoder's statistics serve both the costs and the merge, so they use every "
                           "fit sample: drop --curvature-samples (or lower --samples)")
    acfg = config.analyze_config(DType.auto)
    check_streamed_backend(acfg)
    check_merge(config.merge or Merge.layerwise)
    return acfg


def _merger(opened: Opened, merge: Merge, stats: Mapping[str, FactorStats], config: CompressConfig) -> MergedOf:
    """A class -> its merged weight, members read from the checkpoint in the statistics' precision."""
    acc = torch.float64 if opened.dtype == torch.float64 else torch.float32
    damping = config.analyze_config(DType.auto).layerwise_damping

    def weight_of(name: str) -> Tensor:
        return opened.checkpoint.tensor(name, dtype=acc, device=opened.decoder.device)

    factors: dict[str, InputFactor] = {}

    def factor_of(name: str) -> InputFactor:  # one eigendecomposition per layer, whatever classes it joins
        if name not in factors:
            factors[name] = input_factor(stats[name], config.kfac.rank)
        return factors[name]

    def merged(names: tuple[str, ...]) -> Tensor:
        return merged_value(names, weight_of, merge, stats, rank=config.kfac.rank, damping=damping,
                            factor_of=factor_of)

    return merged
