"""One decoder block at a time: a LLaMA/Mistral/Qwen2-architecture model built on the meta device
from its config, each block's weights loaded from the checkpoint when it is needed and dropped
after. Embeddings, final norm and LM head are loaded as small separate pieces."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hessian_worker.llm.checkpoint import Checkpoint, CheckpointError

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
BLOCKS = "model.layers"
_GB = 1024**3


def architecture(checkpoint: Checkpoint) -> str:
    """The checkpoint's architecture, if it is a decoder this module streams.

    Raises:
        CheckpointError: config.json names another architecture (or none).
    """
    archs = checkpoint.config.get("architectures") or []
    found = next((a for a in archs if a in SUPPORTED), None)
    if found is None:
        raise CheckpointError(f"config.json 'architectures' is {archs}; block-by-block streaming supports "
                              f"{list(SUPPORTED)} (other models load whole: drop --stream)")
    return found


def resolve_dtype(checkpoint: Checkpoint, name: str) -> torch.dtype:
    """``auto`` keeps the checkpoint's stored dtype; else the named one."""
    if name == "auto":
        return checkpoint.stored_dtype
    return getattr(torch, name)


class Decoder:
    """A decoder LLM whose blocks are loaded one at a time (weights frozen, eval mode).

    Args:
        checkpoint: the model directory.
        dtype: the compute dtype of the blocks (statistics are accumulated in float32 or wider).
        device: where blocks and activations run.
    """

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoModelForCausalLM

        self.checkpoint = checkpoint
        self.arch = architecture(checkpoint)
        self.dtype = dtype
        self.device = torch.device(device)
        self.config = AutoConfig.from_pretrained(checkpoint.path, local_files_only=True)
        # fused attention is the fast path; in float64 it is not exact on CPU (1e-7 relative, measured), so
        # float64 runs (references, tests) use the plain softmax attention the in-memory path uses
        self.config._attn_implementation = "eager" if dtype == torch.float64 else "sdpa"
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.skeleton.eval()
        self.num_blocks = int(self.config.num_hidden_layers)
        self.check_weights()
        self.embed = self._load(self.skeleton.model.embed_tokens, "model.embed_tokens.")
        self.norm = self._load(self.skeleton.model.norm, "model.norm.")
        head = "lm_head.weight"
        if head in checkpoint:
            self.head = self._load(self.skeleton.lm_head, "lm_head.")
        else:  # tied word embeddings: the head reads the embedding matrix
            self.head = nn.Linear(self.embed.weight.shape[1], self.embed.weight.shape[0], bias=False)
            self.head.weight = self.embed.weight
        with torch.device(self.device):
            self.rotary = type(self.skeleton.model.rotary_emb)(config=self.config)
        trim_heap()

    def block_prefix(self, i: int) -> str:
        return f"{BLOCKS}.{i}."

    def check_weights(self) -> None:
        """Every tensor the config implies is in the checkpoint with the config's shape.

        Raises:
            CheckpointError: naming the first missing tensor, or the tensor whose shape disagrees.
        """
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        for name, param in self.skeleton.state_dict().items():
            if name == "lm_head.weight" and tied and name not in self.checkpoint:
                continue
            if name not in self.checkpoint:
                raise CheckpointError(f"tensor {name!r} (from config.json) is not in {str(self.checkpoint.path)!r}: "
                                      "the config does not match the weights, or a shard is incomplete")
            shape = self.checkpoint.shape(name)
            if shape != tuple(param.shape):
                raise CheckpointError(f"tensor {name!r} is {list(shape)} in the checkpoint but config.json implies "
                                      f"{list(param.shape)}: the config does not match the weights")

    def _load(self, module: nn.Module, prefix: str) -> nn.Module:
        state = {k: self.checkpoint.tensor(prefix + k, dtype=self.dtype, device=self.device)
                 for k in module.state_dict()}
        module.load_state_dict(state, assign=True, strict=True)
        module.requires_grad_(False)
        return module

    def load_block(self, i: int) -> nn.Module:
        """Block ``i`` with its weights on the device (free it with ``release``)."""
        return self._load(self.skeleton.model.layers[i], self.block_prefix(i))

    def release(self, block: nn.Module) -> None:
        """Drops a block's weights (back to the meta device) and hands the freed memory back."""
        block.to("meta")
        trim_heap()

    def inputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        """The first block's input and the keyword arguments every block of this batch takes."""
        from transformers.masking_utils import create_causal_mask

        ids = batch.get("input_ids", batch.get("input"))
        if ids is None:
            raise CheckpointError(f"a calibration batch for a decoder needs 'input_ids' (token ids); got {sorted(batch)}")
        ids = ids.to(self.device)
        hidden = self.embed(ids)
        positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)
        mask = batch.get("attention_mask")
        mask = mask.to(self.device) if mask is not None else None
        causal = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask, cache=None,
                                    position_ids=positions)
        kwargs = {"attention_mask": causal, "position_ids": positions,
                  "position_embeddings": self.rotary(hidden, position_ids=positions)}
        return hidden, kwargs

    per_token = True  # the output the loss sees has a row per token
    is_logits = True  # and it is logits (the distillation loss ``auto`` is kl)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.head(self.norm(hidden))

    def output(self, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        """What the calibration loss sees from the last block's output: the logits."""
        return self.logits(hidden)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


_LIBC = _libc()


def trim_heap() -> None:
    """Returns freed heap memory to the system (glibc). Blocks' tensors are tens of MB; once glibc
    has freed one such mapping it serves the next ones from its heap, which it keeps: without this a
    1 GB-per-12-blocks model grew the resident set by 730 MB over one pass (measured), with it by
    less than a block."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def run_block(block: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of a streamed analysis, by part (printed before the work starts)."""

    block: int
    embeddings: int
    activations: int
    statistics: int
    pricing: int
    choice: int = 0  # compress: the measured choice and the tie (kept block inputs, merged classes)

    @property
    def total(self) -> int:
        return self.block + self.embeddings + self.activations + self.statistics + self.pricing + self.choice

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / _GB:.2f}" for k, v in (
            ("one block", self.block), ("embeddings+head", self.embeddings), ("activations", self.activations),
            ("statistics", self.statistics), ("pair pricing", self.pricing), ("choice and tie", self.choice))
            if v or k != "choice and tie")
        return f"about {self.total / _GB:.2f} GiB ({parts} GiB)"


def estimate_memory(checkpoint: Checkpoint, *, dtype: torch.dtype, tokens: int, rank: int | None,
                    oversample: int, kept_tokens: int, block_rows: int = 256) -> MemoryEstimate:
    """What a streamed K-FAC analysis holds at its peak, from config.json and the tensor shapes alone."""
    size = torch.empty((), dtype=dtype).element_size()
    hidden = int(checkpoint.config["hidden_size"])
    blocks = int(checkpoint.config["num_hidden_layers"])
    block_names = [n for n in checkpoint.names if n.startswith(f"{BLOCKS}.0.")]
    shapes = [checkpoint.shape(n) for n in block_names]
    block = sum(_numel(s) for s in shapes) * size
    embeddings = sum(_numel(checkpoint.shape(n)) for n in checkpoint.names if not n.startswith(BLOCKS + ".")) * size
    # carried activations (+ their float32 temporaries), and the gradient rows' input of every block
    activations = tokens * hidden * (size * 2 + 8) + kept_tokens * hidden * size * blocks
    linear = [s for s in shapes if len(s) == 2]
    per_block = sum(s[1] * (s[1] if rank is None else min(s[1], rank + oversample)) * 4 * 2 + s[0] * 4
                    for s in linear)
    statistics = per_block * blocks
    widest = max(linear, key=lambda s: s[1])
    r = widest[1] if rank is None else min(widest[1], rank)
    pricing = blocks * block_rows * (widest[1] + blocks * r) * 4 * 2
    return MemoryEstimate(block * 2, embeddings, activations, statistics, pricing)


# the whole-model backends hold the weights, the reference outputs and their own working set: exact
# carries forward-mode tangents for a chunk of directions, projected a sketch of rank + oversample
# model-sized vectors, diagonal a few (measured on MiniLM: 3-6x the float32 weights; 3 is a floor)
WHOLE_MODEL_FACTOR = 3


def whole_model_bytes(checkpoint: Checkpoint, dtype: torch.dtype) -> int:
    """A floor on what a backend that needs the whole model in memory would hold."""
    size = torch.empty((), dtype=dtype).element_size()
    return WHOLE_MODEL_FACTOR * size * sum(_numel(checkpoint.shape(n)) for n in checkpoint.names)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
