"""``geoshare export``: a compressed directory -> a standard checkpoint, every tensor written out."""

from __future__ import annotations

import argparse
import json
from typing import Any

from geoshare.cli.help import add_command, hide


def add_commands(subparsers: Any) -> None:
    """Adds ``export``."""
    e = add_command(
        subparsers, "export", summary="compressed model directory -> standard checkpoint, every tensor written out",
        description="Writes a checkpoint that runtimes knowing nothing of sharing load: aliases copied, bases "
                    "multiplied out, tensor by tensor (hessian_worker.export_dense).",
        examples=["geoshare export out/ --format hf --out dense/",
                  "geoshare export --model out/ --out dense/ --shard-gb 2"])
    e.add_argument("src", nargs="?", metavar="model", help="a directory geoshare compress or apply wrote; or --model")
    e.add_argument("--model", metavar="DIR", help="the compressed directory, the same as the positional")
    e.add_argument("--format", choices=("hf",), default="hf",
                   help="hf: a Hugging Face directory (config.json, tokenizer, model.safetensors or shards)")
    # a directory is --out in every command; -o/--output (a file elsewhere) was export's spelling
    hide(e.add_argument("--out", "-o", "--output", dest="out", required=True, metavar="DIR",
                        help="the new directory"), "-o", "--output")
    e.add_argument("--shard-gb", type=float, default=5.0, metavar="GB", help="largest safetensors shard, GiB")
    e.set_defaults(func=run, extras=("worker",))


def run(args: argparse.Namespace) -> int:
    from hessian_worker.export import export_dense

    if (args.src is None) == (args.model is None):
        raise ValueError("give the compressed directory once: as the argument or as --model DIR")
    out = export_dense(args.src or args.model, args.out, format=args.format, shard_bytes=int(args.shard_gb * 1024**3))
    print(json.dumps({"output": str(out), "format": args.format}))
    return 0
