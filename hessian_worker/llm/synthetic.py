"""Random-weight decoder checkpoints from a config, written shard by shard.

Memory and time of the streamed path are real even when the weights are not, so capacity can be
planned (and the path tested) on a 7B shape without downloading one: no more than one shard's
tensors are ever in memory. Quality claims belong to trained models.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hessian_worker.llm.checkpoint import INDEX

# TinyLlama-1.1B's shape and a LLaMA-7B-shaped one (heads as in the originals, GQA for the 1.1B)
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 96},
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "vocab_size": 32000},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
}
ARCHITECTURES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}


def decoder_config(arch: str = "llama", **fields: Any) -> Any:
    """A transformers config of ``arch`` (llama, mistral, qwen2) with ``fields`` set."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r}: choose one of {sorted(ARCHITECTURES)}")
    fields.setdefault("max_position_embeddings", 4096)
    return getattr(transformers, ARCHITECTURES[arch])(**fields)


def write_random_checkpoint(config: Any, out: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                            shard_bytes: int = 2 * 1024**3, seed: int = 0, std: float = 0.02,
                            progress: bool = False) -> Path:
    """Writes config.json and sharded safetensors (with their index) of a random ``config`` model.

    Each tensor is drawn from its own seeded generator (seed and name), so a checkpoint is the same
    whatever the shard size; norms are ones, the rest N(0, std²).
    """
    from transformers import AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    files: list[list[str]] = []
    size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            files.append(list(shard))
            save_file(shard, str(out / f"part-{len(files):05d}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0

    for name, shape in tqdm(shapes.items(), desc="random weights", disable=not progress, leave=False):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=dtype)
        else:
            tensor = (torch.randn(shape, generator=gen) * std).to(dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
        shard[name] = tensor
        size += nbytes
    flush()
    total = len(files)
    for i, names in enumerate(files, start=1):
        final = f"model-{i:05d}-of-{total:05d}.safetensors"
        (out / f"part-{i:05d}.safetensors").replace(out / final)
        weight_map.update(dict.fromkeys(names, final))
    config.architectures = [type(skeleton).__name__]
    config.torch_dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(out)
    index = {"metadata": {"total_size": sum(_bytes(shapes[n], dtype) for n in weight_map)}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    return out


def _bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        n *= s
    return n


def random_tokens(vocab: int, samples: int, length: int, seed: int = 0) -> torch.Tensor:
    """[samples, length] token ids, uniform over the vocabulary (seeded)."""
    return torch.randint(0, vocab, (samples, length), generator=torch.Generator().manual_seed(seed))
