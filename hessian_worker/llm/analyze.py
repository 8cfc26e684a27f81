"""analyze_checkpoint: a decoder LLM's sharing costs from its checkpoint, streamed block by block.

Memory is estimated from the config before anything is loaded and a run that cannot fit is
refused. The per-layer statistics are cached on disk (keyed by checkpoint, data and settings), so
analysing again (another cost kind, another output scale of the same statistics, a compress at
another ratio) needs no new pass over the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from hessian_worker.config import AnalyzeConfig, Backend, torch_device
from hessian_worker.cost_source import cost_source
from hessian_worker.costs import families_of, pair_sides, pairs_of
from hessian_worker.curvature.kfac import (
    Approximation,
    FactorStats,
    LayerFactors,
    OutputFactor,
    gradient_batches,
    probe_matrix,
    row_block_quads,
    sketch_width,
)
from hessian_worker.data import Calibration, DataSource, load_calibration
from hessian_worker.discovery import LayerInfo, discover_layers
from hessian_worker.distributed import (
    SHARDING,
    Group,
    all_reduce_stats,
    broadcast,
    deal,
    gather,
    is_writer,
    join,
    shard,
    step,
)
from hessian_worker.errors import BackendError, DataError, MemoryBudgetError
from hessian_worker.llm.blocks import ModuleBlocks, ModuleWeights
from hessian_worker.llm.checkpoint import Checkpoint, CheckpointError
from hessian_worker.llm.decoder import (
    SUPPORTED,
    Decoder,
    MemoryEstimate,
    estimate_memory,
    resolve_dtype,
    trim_heap,
)
from hessian_worker.llm.exact import exact_memory, streamed_exact_costs
from hessian_worker.llm.stream import stream_factors
from hessian_worker.losses import resolve_distill
from hessian_worker.options import Shrinkage
from hessian_worker.pair_costs import to_problem
from solver.schema import CostKind, SharingProblem

log = logging.getLogger("geoshare.llm")
STREAMED = (Backend.kfac, Backend.layerwise)


def is_streamable(spec: str | Path) -> bool:
    """True for a model directory whose config names a decoder architecture this package streams."""
    config = Path(spec) / "config.json"
    try:
        archs = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a in SUPPORTED for a in archs)


def output_factor(config: AnalyzeConfig) -> OutputFactor:
    """kfac weighs outputs by sampled gradients; layerwise is kfac without that (identity)."""
    return config.kfac.output if config.backend is Backend.kfac else OutputFactor.identity


@dataclass
class Opened:
    """A streamed model ready to run: where its weights are read (a checkpoint, or an in-memory
    model's own tensors), compute dtype, blocks, calibration data and the layers analysed (what
    every streamed stage starts from)."""

    checkpoint: Checkpoint | ModuleWeights
    dtype: torch.dtype
    decoder: Decoder | ModuleBlocks
    calib: Calibration
    layers: list[LayerInfo]

    @property
    def on_disk(self) -> bool:
        """Read from a checkpoint (memory estimated and checked, statistics cached) rather than a
        model already in memory."""
        return isinstance(self.checkpoint, Checkpoint)


def open_blocks(blocks: ModuleBlocks, data: DataSource, config: AnalyzeConfig, *,
                tokenizer: Any | None = None) -> Opened:
    """An in-memory model seen block by block (``llm.blocks``), with its calibration batches."""
    calib = load_calibration(data, tokenizer=tokenizer, samples=config.samples, batch_size=config.batch_size,
                             seed=config.seed, max_length=config.max_length)
    layers = discover_layers(blocks.skeleton, config.targets, config.ignore, config.families)
    outside = [x.name for x in layers if not any(x.name.startswith(blocks.block_prefix(i))
                                                 for i in range(blocks.num_blocks))]
    if outside:
        raise BackendError(f"layers outside the blocks cannot be streamed: {outside[:3]}; leave them out with "
                           "ignore=[...] (sharing ties layers across blocks)")
    return Opened(blocks.checkpoint, blocks.dtype, blocks, calib, layers)


def open_checkpoint(path: str | Path, data: DataSource | None, config: AnalyzeConfig, *,
                    tokenizer: Any | None = None) -> Opened:
    """The checkpoint, its skeleton and the calibration batches (tokenized with the directory's
    tokenizer when ``data`` is text; the built-in sentences when None)."""
    checkpoint = Checkpoint(path)
    dtype = resolve_dtype(checkpoint, config.dtype.value)
    decoder = Decoder(checkpoint, dtype, torch_device(config))
    if data is None:  # the built-in sentences, as for every tokenized model
        from hessian_worker.data import DEFAULT_SENTENCES

        data = DEFAULT_SENTENCES
    if tokenizer is None and _is_text(data):
        tokenizer = _tokenizer(checkpoint)
    calib = load_calibration(data, tokenizer=tokenizer, samples=config.samples, batch_size=config.batch_size,
                             seed=config.seed, max_length=config.max_length)
    layers = discover_layers(decoder.skeleton, config.targets, config.ignore, config.families)
    return Opened(checkpoint, dtype, decoder, calib, layers)


def analysis_estimate(opened: Opened, config: AnalyzeConfig, data: Calibration | None = None) -> MemoryEstimate:
    """The peak memory of the statistics pass over ``data`` (default: all the calibration data)."""
    data = data or opened.calib
    k = config.kfac
    kept = (sum(rows for _, rows in gradient_batches(data, k.gradient_samples))
            if output_factor(config) is OutputFactor.diagonal else 0)
    return estimate_memory(opened.checkpoint, dtype=opened.dtype, tokens=token_count(data), rank=k.rank,
                           oversample=k.oversample, kept_tokens=kept * token_count(data) // max(data.num_samples, 1))


def factor_statistics(opened: Opened, data: Calibration, config: AnalyzeConfig, cache_dir: str | Path | None, *,
                      token_inputs: dict[str, FactorStats] | None = None,
                      group: Group | None = None) -> tuple[dict[str, FactorStats], bool]:
    """(every analysed layer's factor sums over ``data``, read from the cache?): one streamed pass,
    or none when ``cache_dir`` holds them already. ``token_inputs``: see ``stream_factors`` (a pass
    that fills it is never cached). With a ``group`` (torch.distributed), each rank streams its
    batches and the sums are added up over the ranks; the cache is read when every rank finds it
    and written by rank 0 (it holds the sums of all the data, whatever the number of ranks)."""
    k = config.kfac
    output = output_factor(config)
    reduce = pooled(opened.decoder, config)
    if not opened.on_disk or (reduce and token_inputs is not None):
        cache_dir = None  # the cache is keyed by the checkpoint's files and holds one set of sums
    with step(group, "reading the statistics cache") as cache:
        key = stats_key(opened.checkpoint, data, config, output, opened.dtype) if cache_dir else ""
        stats = load_stats(cache_dir, key, opened.layers, k.rank, k.oversample, config.seed) if cache_dir else None
        cache.share = stats is not None
    if stats is not None and all(cache.shared):
        return stats, True
    with step(group, "the statistics pass"):
        stats = stream_factors(opened.decoder, data, opened.layers, rank=k.rank, oversample=k.oversample,
                               output=output, seed=config.seed, gradient_samples=k.gradient_samples, reduce=reduce,
                               loss=resolve_distill(config.distill, opened.decoder.is_logits).__name__,
                               token_inputs=token_inputs, progress=config.progress,
                               batches=None if group is None else group.batches(len(data.batches)))
    all_reduce_stats(group, stats)
    if token_inputs is not None:
        all_reduce_stats(group, token_inputs)
    if cache_dir:
        with step(group, "writing the statistics cache"):
            if is_writer(group):
                save_stats(cache_dir, key, stats)
    return stats, False


def pooled(decoder: Any, config: AnalyzeConfig) -> bool:
    """K-FAC ``reduce``: asked for, or ``auto`` on a model whose loss sees one row per sample (as
    the in-memory ``collect_factors`` decides by the output's shape). The layerwise backend's error
    is per token, always."""
    if config.backend is Backend.layerwise:
        return False
    approximation = config.kfac.approximation
    return approximation is Approximation.reduce or (approximation is Approximation.auto and not decoder.per_token)


def price(opened: Opened, stats: dict[str, FactorStats], config: AnalyzeConfig, *,
          keep_stats: bool = False, group: Group | None = None) -> tuple[list[list[float | None]], dict[str, float]]:
    """(the cost matrix, seconds by phase) from the factor sums and the weights. Unless ``keep_stats``,
    each layer's sums are dropped as soon as its factors are formed, so both never sit in memory whole.
    With a ``group``, this rank forms the factors and prices the pairs of its families only
    (``my_families``; the others' entries are None until ``merge_costs``)."""
    k = config.kfac
    output = output_factor(config)
    mine = my_families(opened.layers, group)
    clock = time.perf_counter()
    factors = {x.name: LayerFactors.of(stats[x.name] if keep_stats else stats.pop(x.name), k.rank, output,
                                       x.shape[0])
               for x in opened.layers if mine is None or x.family in mine}
    if not keep_stats:  # another rank prices these
        for x in opened.layers:
            stats.pop(x.name, None)
    trim_heap()
    seconds = {"factors": time.perf_counter() - clock}
    clock = time.perf_counter()
    matrix = streamed_costs(opened.layers, factors, opened.checkpoint, config.kind, progress=config.progress,
                            families=mine)
    seconds["pricing"] = time.perf_counter() - clock
    return matrix, seconds


def my_families(layers: Sequence[LayerInfo], group: Group | None) -> set[str] | None:
    """The families this rank prices (None: all): dealt by their pricing work, members² x the
    weight's size (each row block is multiplied by every member's factor)."""
    if group is None or group.world_size == 1:
        return None
    fams = families_of(layers)
    keys = list(fams)
    work = [len(fams[f]) ** 2 * layers[fams[f][0]].shape[0] * layers[fams[f][0]].shape[1] for f in keys]
    return {f for f, rank in zip(keys, deal(work, group.world_size), strict=True) if rank == group.rank}


def merge_costs(group: Group | None, matrix: list[list[float | None]]) -> list[list[float | None]]:
    """The whole cost matrix on every rank from each rank's priced families (entries off the
    diagonal that a rank priced; every pair is priced by exactly one rank)."""
    if group is None or group.world_size == 1:
        return matrix
    n = len(matrix)
    mine = [(i, j, v) for i in range(n) for j in range(n) if i != j and (v := matrix[i][j]) is not None]
    merged = [row[:] for row in matrix]
    for entries in gather(group, mine, "the pair costs"):
        for i, j, v in entries:
            merged[i][j] = v
    return merged


def streamed_problem(opened: Opened, matrix: list[list[float | None]], config: AnalyzeConfig,
                     estimate: MemoryEstimate | None, cached: bool, seconds: Mapping[str, float],
                     group: Group | None = None, *, data: Calibration | None = None) -> SharingProblem:
    """The SharingProblem, its ``source`` recording how it was streamed (and, in a distributed job,
    over how many processes and how many samples of ``data``, default all the calibration data,
    each ran)."""
    problem = to_problem(opened.layers, matrix, config)
    source = cost_source(config, task_loss=False)
    source.update(streamed=True, dtype=str(opened.dtype).removeprefix("torch."), statistics_cached=cached,
                  seconds={k: round(v, 3) for k, v in seconds.items()})
    if estimate is not None:
        source["memory_estimate_bytes"] = estimate.total
    if group is not None:
        sizes = (data or opened.calib).sizes
        source.update(world_size=group.world_size, sharding=SHARDING,
                      rank_samples=[sum(sizes[b] for b in shard(len(sizes), r, group.world_size))
                                    for r in range(group.world_size)])
    return problem.model_copy(update={"source": source})


def analyze_checkpoint(path: str | Path, data: DataSource | None, config: AnalyzeConfig | None = None, *,
                       memory_limit_gb: float | None = None, cache_dir: str | Path | None = None,
                       tokenizer: Any | None = None) -> SharingProblem:
    """The SharingProblem of a decoder checkpoint, with one block in memory at a time.

    Args:
        path: a Hugging Face directory of a LLaMA/Mistral/Qwen2-architecture model (safetensors).
        data: calibration token ids (a ``torch.save``'d tensor or dict with ``input_ids``) or text
            (tokenized with the directory's tokenizer).
        config: ``backend`` kfac (default here), layerwise or exact; ``dtype`` auto keeps the checkpoint's.
        memory_limit_gb: refuse above this estimate (default: the memory available now).
        cache_dir: where per-layer statistics are kept between runs (None: not cached).

    In a torch.distributed job (started by torchrun, or a process group initialized before the
    call) every rank calls this: each streams its share of the batches, the sums are all-reduced,
    the families are priced across ranks, and every rank returns rank 0's problem
    (``hessian_worker.distributed``).

    Raises:
        CheckpointError, BackendError, MemoryBudgetError, DataError: with the fix in the message.
        DistributedError: another rank failed, or the ranks stopped answering within the timeout.
    """
    config = config or AnalyzeConfig(backend=Backend.kfac)
    if config.backend is not Backend.exact:
        check_streamed_backend(config)
    group = join(torch_device(config))
    config = quiet_followers(config, group)
    with step(group, "opening the checkpoint"):
        opened = open_checkpoint(path, data, config, tokenizer=tokenizer)
    return analyze_opened(opened, config, memory_limit_gb=memory_limit_gb, cache_dir=cache_dir, group=group)


def analyze_blocks(blocks: ModuleBlocks, data: DataSource, config: AnalyzeConfig, *,
                   tokenizer: Any | None = None) -> SharingProblem:
    """The streamed analysis of a model already in memory (``llm.blocks``): block by block as for a
    checkpoint, so the streamed path is checked against the in-memory one on the same model."""
    if config.backend is not Backend.exact:
        check_streamed_backend(config)
    group = join(blocks.device)
    config = quiet_followers(config, group)
    with step(group, "reading the calibration data"):
        opened = open_blocks(blocks, data, config, tokenizer=tokenizer)
    return analyze_opened(opened, config, group=group)


def analyze_opened(opened: Opened, config: AnalyzeConfig, *, memory_limit_gb: float | None = None,
                   cache_dir: str | Path | None = None, group: Group | None = None) -> SharingProblem:
    """The SharingProblem of an opened model: kfac/layerwise from streamed statistics (cached when
    read from a checkpoint), exact from forward-mode tangents carried block by block. With a
    ``group`` (torch.distributed) the statistics are data parallel and every rank returns rank 0's
    problem."""
    if group is not None and group.world_size > 1:
        check_shardable(opened.calib, config, group)
    if config.backend is Backend.exact:  # forward-mode tangents carried block by block: no statistics
        estimate = exact_memory(opened.decoder, opened.calib, config.chunk) if opened.on_disk else None
        if estimate is not None:
            check_memory(estimate, memory_limit_gb, config.progress,
                         "fewer calibration samples (--samples), --backend kfac, or a machine with more memory")
        clock = time.perf_counter()
        matrix = streamed_exact_costs(opened.decoder, opened.calib, opened.layers, config, progress=config.progress)
        return streamed_problem(opened, matrix, config, estimate, False, {"pricing": time.perf_counter() - clock},
                                group)
    check_streamed_backend(config)
    with step(group, "the memory check"):
        own = opened.calib if group is None else Calibration([opened.calib.batches[b] for b in
                                                               group.batches(len(opened.calib.batches))])
        estimate = analysis_estimate(opened, config, own) if opened.on_disk else None
        if estimate is not None:
            check_memory(estimate, memory_limit_gb, config.progress)
    clock = time.perf_counter()
    stats, cached = factor_statistics(opened, opened.calib, config, cache_dir, group=group)
    seconds = {"statistics": time.perf_counter() - clock}
    with step(group, "pricing"):
        matrix, more = price(opened, stats, config, group=group)
    matrix = merge_costs(group, matrix)
    with step(group, "the problem"):
        problem = streamed_problem(opened, matrix, config, estimate, cached, {**seconds, **more}, group)
    return broadcast(group, problem)


def quiet_followers(config: AnalyzeConfig, group: Group | None) -> AnalyzeConfig:
    """Progress bars and the memory line on rank 0 only (the ranks move in step)."""
    return config if is_writer(group) else config.model_copy(update={"progress": False})


def check_shardable(calib: Calibration, config: AnalyzeConfig, group: Group) -> None:
    """Raises on every rank alike when the analysis cannot be split over the group's processes.

    Raises:
        BackendError: the exact backend (not data parallel).
        DataError: fewer calibration batches than processes.
    """
    if config.backend is Backend.exact:
        raise BackendError(f"backend='exact' does not run data parallel ({group.world_size} processes): run it in "
                           "one process, or use backend='kfac' or 'layerwise'")
    if len(calib.batches) < group.world_size:
        raise DataError(f"{len(calib.batches)} calibration batches for {group.world_size} processes: every process "
                        "runs whole batches; give more samples (--samples), a smaller --batch-size, or fewer "
                        "processes")


def check_streamed_backend(config: AnalyzeConfig) -> None:
    """Raises BackendError for a backend that needs the whole model in memory."""
    if config.backend not in STREAMED:
        raise BackendError(f"backend={config.backend.value!r} needs the whole model in memory; a streamed decoder "
                           "is priced by backend='kfac' (sampled output gradients, loss units) or 'layerwise' "
                           "(and analysed by 'exact' too, a forward per pair)")
    if config.shrinkage not in (Shrinkage.none, Shrinkage.held_out, 0.0):  # held-out: chosen by compress's choice
        raise BackendError(f"shrinkage={_setting(config.shrinkage)!r}: a streamed decoder's costs and merge use its "
                           "K-FAC input sums (a sketch's top eigenpairs plus the mean of the rest, itself a shrinkage "
                           "of the spectrum's tail), which are not shrunk further yet; pass --shrinkage none")


def _setting(value: Shrinkage | float) -> str | float:
    return value.value if isinstance(value, Shrinkage) else value


def _is_text(data: DataSource | None) -> bool:
    if isinstance(data, (str, Path)):
        return Path(data).suffix in (".txt", ".text")
    return isinstance(data, Sequence) and bool(data) and all(isinstance(x, str) for x in data)


def _tokenizer(checkpoint: Checkpoint) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(checkpoint.path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"text calibration data needs the tokenizer files in {str(checkpoint.path)!r} "
                              f"({exc}); or give token ids as a torch.save'd tensor") from exc
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def token_count(calib: Calibration) -> int:
    return sum(int(next(iter(b.values())).numel()) for b in calib.batches)


KFAC_FIX = "fewer calibration samples (--samples), a smaller --kfac-rank, or a machine with more memory"


def check_memory(estimate: MemoryEstimate, limit_gb: float | None, show: bool, fix: str = KFAC_FIX, *,
                 what: str = "streamed analysis") -> None:
    """Prints the estimate; refuses when it exceeds the limit (default: memory available now), naming ``fix``."""
    limit = int(limit_gb * 1024**3) if limit_gb is not None else int(psutil.virtual_memory().available)
    message = f"{what} needs {estimate.describe()}; {limit / 1024**3:.2f} GiB available"
    log.info(message)
    if show:
        tqdm.write(message)
    if estimate.total > limit:
        raise MemoryBudgetError(f"{message}: {fix}", estimate.total, limit)


def streamed_costs(layers: Sequence[LayerInfo], factors: Mapping[str, LayerFactors], checkpoint: Checkpoint,
                   kind: CostKind, *, progress: bool = False,
                   families: Collection[str] | None = None) -> list[list[float | None]]:
    """The cost matrix from the factors and the weights, each family read row block by row block
    (``families``: only those, the other pairs left None)."""
    n = len(layers)
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    for i in range(n):
        matrix[i][i] = 0.0
    coef = (0.5, -0.5) if kind is CostKind.pairwise else (1.0, 0.0)
    fams = {f: members for f, members in families_of(layers).items() if families is None or f in families}
    for members in tqdm(list(fams.values()), desc="pair costs (families)", disable=not progress, leave=False):
        names = [layers[i].name for i in members]
        position = {layer: p for p, layer in enumerate(members)}
        pairs = [(position[a], position[b]) for a, b in pairs_of(members, kind)]

        def rows_of(rows: slice, names: list[str] = names) -> Tensor:
            first = checkpoint.rows(names[0], rows, dtype=torch.float32)
            out = torch.empty(len(names), *first.shape, dtype=torch.float32)
            out[0] = first
            for i, name in enumerate(names[1:], start=1):  # one member's rows at a time: no second copy
                out[i] = checkpoint.rows(name, rows, dtype=torch.float32)
            return out

        table = row_block_quads([factors[x] for x in names], rows_of, layers[members[0]].shape[0])
        at_a, at_b = pair_sides(table, pairs)
        # ΔL ≈ ½δᵀHδ (distillation: no first-order term at the reference)
        values = (0.5 * (coef[0] ** 2 * at_a + coef[1] ** 2 * at_b)).clamp_min(0.0).tolist()
        del table
        trim_heap()
        for (a, b), v in zip(pairs, values, strict=True):
            matrix[members[a]][members[b]] = v
            if kind is CostKind.pairwise:
                matrix[members[b]][members[a]] = v
    return matrix


def stats_key(checkpoint: Checkpoint, calib: Calibration, config: AnalyzeConfig, output: OutputFactor,
              dtype: torch.dtype) -> str:
    """A digest of everything the statistics depend on: the checkpoint's files, the calibration
    tokens, and the settings that shape the sums."""
    digest = hashlib.sha256()
    for file in sorted(set(checkpoint.files.values())):
        stat = (checkpoint.path / file).stat()
        digest.update(f"{file}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    for batch in calib.batches:
        for name in sorted(batch):
            digest.update(name.encode())
            digest.update(batch[name].contiguous().cpu().numpy().tobytes())
    k = config.kfac
    digest.update(json.dumps([str(checkpoint.path.resolve()), k.rank, k.oversample, output.value, config.seed,
                              k.gradient_samples, k.approximation.value, str(dtype)]).encode())
    return digest.hexdigest()[:32]


def save_stats(cache_dir: str | Path, key: str, stats: Mapping[str, FactorStats]) -> Path:
    """One safetensors file of every layer's sums (the sketches' test matrices are re-drawn from the seed)."""
    folder = Path(cache_dir).expanduser() / key
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for name, s in stats.items():
        tensors[f"{name}/a"] = s.a.contiguous().cpu()
        tensors[f"{name}/a_trace"] = s.a_trace.reshape(1).cpu()
        tensors[f"{name}/tokens"] = torch.tensor([s.tokens], dtype=torch.int64)
        if s.b is not None:
            tensors[f"{name}/b"] = s.b.contiguous().cpu()
    part = folder / "stats.safetensors.part"
    save_file(tensors, str(part))
    part.replace(folder / "stats.safetensors")  # a cut-off run leaves no half-written cache
    return folder


def load_stats(cache_dir: str | Path, key: str, layers: Sequence[LayerInfo], rank: int | None, oversample: int,
               seed: int) -> dict[str, FactorStats] | None:
    """The cached sums for ``key``, or None when there are none (or they lack a layer)."""
    file = Path(cache_dir).expanduser() / key / "stats.safetensors"
    if not file.is_file():
        return None
    tensors = load_file(str(file))
    out = {}
    for x in layers:
        if f"{x.name}/a" not in tensors:
            return None
        a = tensors[f"{x.name}/a"]
        width = sketch_width(x.shape[1], rank, oversample)
        omega = None if width is None else probe_matrix(x.shape[1], width, seed).to(a.dtype)
        out[x.name] = FactorStats(a, tensors[f"{x.name}/a_trace"][0], int(tensors[f"{x.name}/tokens"][0]),
                                  tensors.get(f"{x.name}/b"), omega)
    log.info("K-FAC statistics read from %s", file)
    return out
