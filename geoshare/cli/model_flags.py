"""Flags the model commands share (analyze, apply, compress) and their translation into configs.

Choices are the values of the torch-free enums in hessian_worker.options, and
tests/hessian_worker/test_hw_cli_options.py checks each ``analyze``/``compress`` flag against its
AnalyzeConfig/CompressConfig field, so flags cannot drift from the configs. Naming: ``-o/--output``
is always a file, ``--out`` always a directory; a count of samples says ``-samples``, a share of
them is a FRACTION in [0, 1).
"""

from __future__ import annotations

import argparse
from enum import Enum
from typing import Any

from geoshare.cli.help import hide
from hessian_worker.options import (
    AUTO_SCHEME,
    Backend,
    DType,
    OutputFactor,
    RelaxedPricing,
    Shrinkage,
    SideChoice,
)
from solver.schema import Scheme


def values(enum: type[Enum]) -> tuple[str, ...]:
    """An enum's values, in its order: the choices of its flag."""
    return tuple(member.value for member in enum)


BACKENDS = values(Backend)


def model_options(parser: argparse.ArgumentParser) -> None:
    """The model, its calibration data and how to run it."""
    parser.add_argument("--model", required=True, metavar="SPEC",
                        help="minilm (packaged all-MiniLM-L6-v2) | a Hugging Face directory | module:factory")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="calibration data: a text file (one sample a line) or torch.save'd tensor(s) "
                             "(default: built-in sentences, for models with a tokenizer)")
    parser.add_argument("--samples", type=int, default=None, metavar="N",
                        help="calibration samples drawn (seeded; default: all)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="samples per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of every sampled choice (splits, probes, sketches)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=values(DType), default=None,
                        help="compute dtype (default: float32; a streamed checkpoint keeps its own, auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def backend_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="how pair costs are predicted (default: kfac for a LLaMA/Mistral/Qwen2 checkpoint "
                             f"directory, {what} block by block; exact otherwise)")


def holdout_samples_option(parser: argparse.ArgumentParser, default: str) -> None:
    """``--holdout-samples N`` (a count; ``--holdout``, its old spelling, still works)."""
    hide(parser.add_argument("--holdout-samples", "--holdout", dest="holdout_samples", type=int, default=None,
                             metavar="N", help=f"samples held out for the measured loss change, a count "
                                               f"(default: {default})"), "--holdout")


def streaming_options(parser: argparse.ArgumentParser) -> None:
    """The kfac backend's settings and the streamed path's cache and memory limit."""
    parser.add_argument("--kfac-rank", type=int, default=64, metavar="R",
                        help="kfac: eigenpairs of each layer's input covariance kept, the rest as one bulk value "
                             "(0: all of them, exact K-FAC)")
    parser.add_argument("--kfac-oversample", type=int, default=64, metavar="N",
                        help="kfac: sketch columns beyond --kfac-rank")
    parser.add_argument("--kfac-gradient-samples", type=int, default=16, metavar="N",
                        help="kfac: samples whose sampled output gradients estimate the output factor (0: all)")
    parser.add_argument("--kfac-output", choices=values(OutputFactor), default="diagonal",
                        help="kfac: output factor from sampled output gradients (loss units), or identity (no backward)")
    parser.add_argument("--stats-cache", default="~/.cache/geoshare/stats", metavar="DIR",
                        help="streamed analysis: folder of cached per-layer statistics (one pass, many analyses)")
    parser.add_argument("--no-stats-cache", action="store_true", help="streamed analysis: neither read nor write the cache")
    parser.add_argument("--memory-limit-gb", type=float, default=None, metavar="GB",
                        help="refuse above this memory estimate (projected: 4; streamed: the memory available now)")


def scheme_options(parser: argparse.ArgumentParser, *, auto: bool = False) -> None:
    """``--scheme`` and the basis and relaxed schemes' flags (``--basis-rank`` is added by each command); ``auto``
    offers ``--scheme auto`` (compress: every scheme at the same ratio, the least measured loss wins)."""
    choices = (*values(Scheme), AUTO_SCHEME) if auto else values(Scheme)
    parser.add_argument("--scheme", choices=choices, default="tie",
                        help="tie: a class shares one tensor; basis: a class shares a low-rank basis; relaxed: a "
                             "class shares one tensor and each layer keeps a low-rank correction"
                             + ("; auto: every scheme at the same ratio, measured on the same samples, the least "
                                "measured loss wins (the basis flags apply to its basis part)" if auto else ""))
    parser.add_argument("--rank-ratio", type=float, default=None, metavar="FRACTION",
                        help="--scheme basis: rank as a share of min(d_out, d_in) (default 0.25; or --basis-rank); "
                             "--scheme relaxed: correction rank as a share of it (default 0.0625)")
    parser.add_argument("--side", choices=values(SideChoice), default=None,
                        help="--scheme basis: shared factor (auto: the larger dimension; out: d_out x r; in: r x d_in)")
    parser.add_argument("--correction-rank", type=int, default=None, metavar="R",
                        help="--scheme relaxed: the rank r of every layer's own correction A_l B_l beside its class's "
                             "shared tensor (default: --rank-ratio of min(d_out, d_in)); compress lowers it until the "
                             "budget fits and also measures the plans at other ranks, e.g. --correction-rank 24")
    parser.add_argument("--relaxed-pricing", choices=values(RelaxedPricing), default=None,
                        help="--scheme relaxed: price each pair's residual by the input covariances with one output "
                             "scale per layer (kronecker, default: cheap at any size) or by the exact GGN's per-layer "
                             "blocks (exact: two forward-mode passes per pair and rank; ranks plans as measured)")
    parser.add_argument("--no-output-weighting", action="store_true",
                        help="--scheme basis or relaxed: count every layer's output error alike (default: weigh it "
                             "by the layer's output-side curvature, so costs are predicted loss changes)")


def shrinkage_option(parser: argparse.ArgumentParser) -> None:
    """--shrinkage: how the input covariances of the layerwise merge and costs are shrunk."""
    parser.add_argument("--shrinkage", type=shrinkage_setting, default=None, metavar="|".join(values(Shrinkage)) + "|RHO",
                        help="input covariances of the layerwise merge and costs (and the basis whitening): shrunk "
                             "toward a scaled identity by an intensity estimated from the data (ledoit-wolf, oas), a "
                             "fixed intensity RHO in [0, 1], or not (none); held-out (compress): the layerwise "
                             "merge's intensity of least loss on the choice's held-out samples; default: the "
                             "configs' default")


def shrinkage_setting(text: str) -> Shrinkage | float:
    """A --shrinkage value: an estimator's name or an intensity in [0, 1]."""
    if text in values(Shrinkage):
        return Shrinkage(text)
    try:
        rho = float(text)
    except ValueError:
        rho = -1.0
    if not 0.0 <= rho <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is neither {', '.join(values(Shrinkage))} nor a number in [0, 1]")
    return rho


def refuse_without_scheme(given: list[str], scheme: str) -> None:
    """Raises a ValueError naming the ``given`` flags (any) that apply to ``--scheme {scheme}`` only."""
    if given:
        verb, them = ("applies", "it") if len(given) == 1 else ("apply", "them")
        raise ValueError(f"{', '.join(given)} {verb} to --scheme {scheme} only; add --scheme {scheme} or drop {them}")


def basis_options(args: argparse.Namespace, rank: int | None) -> dict[str, Any]:
    """BasisOptions fields from the basis rank, --rank-ratio, --side (refused without --scheme basis or auto)."""
    if args.scheme not in ("basis", AUTO_SCHEME):
        relaxed = args.scheme == "relaxed"  # --rank-ratio and --no-output-weighting are relaxed flags too
        given = [flag for flag, v in (("--basis-rank", rank),
                                      ("--rank-ratio", None if relaxed else args.rank_ratio),
                                      ("--side", args.side),
                                      ("--no-output-weighting", None if relaxed else args.no_output_weighting or None))
                 if v is not None]
        refuse_without_scheme(given, "basis")
        return {}
    if rank is not None and args.rank_ratio is not None:
        raise ValueError("pass --basis-rank (one rank for every family) or --rank-ratio, not both")
    fields: dict[str, Any] = {"rank": rank, "side": args.side or "auto",
                              "output_weighting": not args.no_output_weighting}
    if args.rank_ratio is not None:
        fields["rank_ratio"] = args.rank_ratio
    return fields


def relaxed_options(args: argparse.Namespace) -> dict[str, Any]:
    """RelaxedOptions fields from --correction-rank, --rank-ratio, --relaxed-pricing,
    --no-output-weighting (the correction rank and the pricing are refused without --scheme relaxed)."""
    if args.scheme != "relaxed":
        given = [flag for flag, v in (("--correction-rank", args.correction_rank),
                                      ("--relaxed-pricing", args.relaxed_pricing)) if v is not None]
        refuse_without_scheme(given, "relaxed")
        return {}
    if args.correction_rank is not None and args.rank_ratio is not None:
        raise ValueError("pass --correction-rank (one rank for every family) or --rank-ratio, not both")
    fields: dict[str, Any] = {"rank": args.correction_rank, "output_weighting": not args.no_output_weighting}
    if args.rank_ratio is not None:
        fields["rank_ratio"] = args.rank_ratio
    if args.relaxed_pricing is not None:
        fields["pricing"] = args.relaxed_pricing
    return fields


def kfac_options(args: argparse.Namespace) -> dict[str, Any]:
    """KFACOptions fields from the --kfac-* flags (0 means all: None)."""
    return {"rank": args.kfac_rank or None, "oversample": args.kfac_oversample, "output": args.kfac_output,
            "gradient_samples": args.kfac_gradient_samples or None}


def stats_cache(args: argparse.Namespace) -> str | None:
    return None if args.no_stats_cache else args.stats_cache


def data_source(data: str | None, tokenizer: Any) -> Any:
    """``--data``, else the built-in sentences for a model that has a tokenizer."""
    from hessian_worker.data import DEFAULT_SENTENCES

    if data is not None:
        return data
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; pass --data with a torch.save'd tensor file")
    return DEFAULT_SENTENCES


def check_whole_model_fits(model: str, dtype: str, backend: str, limit_gb: float | None) -> None:
    """Refuses a whole-model backend on a decoder checkpoint too large for memory, naming the one that fits.

    Raises:
        MemoryBudgetError: the model's estimate is over the limit (default: memory available now).
    """
    import psutil

    from hessian_worker.errors import MemoryBudgetError
    from hessian_worker.llm.checkpoint import Checkpoint
    from hessian_worker.llm.decoder import resolve_dtype, whole_model_bytes

    checkpoint = Checkpoint(model)
    need = whole_model_bytes(checkpoint, resolve_dtype(checkpoint, dtype))
    limit = int(limit_gb * 1024**3) if limit_gb is not None else int(psutil.virtual_memory().available)
    if need > limit:
        raise MemoryBudgetError(
            f"--backend {backend} holds the whole model: at least {need / 1024**3:.1f} GiB in {dtype}, "
            f"{limit / 1024**3:.1f} GiB available; --backend kfac (the default for this checkpoint) streams it "
            "one block at a time", need, limit)
