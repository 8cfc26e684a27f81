"""Models already in memory behind the block-by-block interface of ``Decoder``.

The streamed stages (statistics, exact tangents, the measured choice, the merge, the save) need
little of a model: its blocks one at a time, the first block's input and the keyword arguments
every block takes, and the output the loss sees after the last block. ``ModuleBlocks`` gives that
for any model whose layers sit in a list of blocks, so the streamed path runs on the small models
the in-memory path runs on (MiniLM, the bench's GPT) and is checked against it there;
``ModuleWeights`` serves the model's own tensors where a checkpoint's would be read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

Embed = Callable[[Mapping[str, Tensor]], tuple[Tensor, dict[str, Any]]]
Head = Callable[[Tensor, Tensor | None], Tensor]


class ModuleWeights:
    """A model's tensors with the reading calls of ``Checkpoint`` (copies: the model is never changed)."""

    def __init__(self, model: nn.Module) -> None:
        self.state = model.state_dict()

    def __contains__(self, name: str) -> bool:
        return name in self.state

    @property
    def names(self) -> list[str]:
        return list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def tensor(self, name: str, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> Tensor:
        t = self.state[name].detach()
        return t.to(device=device, dtype=dtype or t.dtype, copy=True)

    def rows(self, name: str, rows: slice, *, dtype: torch.dtype | None = None) -> Tensor:
        t = self.state[name].detach()[rows]
        return t.to(dtype=dtype or t.dtype, copy=True)


class ModuleBlocks:
    """An in-memory model seen block by block.

    Args:
        model: the model (eval mode; its weights are never modified).
        blocks: the attribute path of its list of blocks ("blocks", "encoder.layer").
        embed: batch -> (the first block's input, the keyword arguments of every block).
        head: (the last block's output, the attention mask or None) -> what the loss sees.
        per_token: whether that output has a row per token (logits) or per sample (a pooled embedding).
        is_logits: whether the in-memory path takes it for logits (``losses.extract_output``: an
            output named ``logits``), which makes the ``auto`` distillation loss kl, else mse.
    """

    def __init__(self, model: nn.Module, blocks: str, embed: Embed, head: Head, *, per_token: bool,
                 is_logits: bool = False) -> None:
        self.skeleton = model.eval()
        self.checkpoint = ModuleWeights(model)
        self.blocks: nn.ModuleList = model.get_submodule(blocks)
        self.prefix = blocks + "."
        self.embed, self.head, self.per_token, self.is_logits = embed, head, per_token, is_logits
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.num_blocks = len(self.blocks)

    def block_prefix(self, i: int) -> str:
        return f"{self.prefix}{i}."

    def load_block(self, i: int) -> nn.Module:
        return self.blocks[i]

    def release(self, block: nn.Module) -> None:
        """Nothing to free: the block stays in the model."""

    def inputs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        with torch.no_grad():
            return self.embed({k: v.to(self.device) for k, v in batch.items()})

    def output(self, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.head(hidden, None if mask is None else mask.to(self.device))


def mean_pool(hidden: Tensor, mask: Tensor | None) -> Tensor:
    """The mean over real tokens (what ``losses.extract_output`` takes from an encoder)."""
    if mask is None:
        return hidden.mean(dim=1)
    w = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def bert_blocks(model: nn.Module) -> ModuleBlocks:
    """A BERT-style encoder (MiniLM) block by block: embeddings, then ``encoder.layer``, and the
    mean-pooled last hidden state, with the attention mask the model itself builds."""

    def embed(batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        hidden = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
        mask, _ = model._create_attention_masks(attention_mask=batch.get("attention_mask"),
                                                encoder_attention_mask=None, embedding_output=hidden,
                                                encoder_hidden_states=None, cache=None, position_ids=None)
        return hidden, {"attention_mask": mask}

    return ModuleBlocks(model, "encoder.layer", embed, mean_pool, per_token=False)
