"""The packaged all-MiniLM-L6-v2 as a task: sentence embeddings judged by cosine to the original's.

Sentence-embedding users compare directions, so the metric is the mean cosine of a compressed
copy's embeddings (masked mean pooling, L2-normalized, as sentence-transformers) to the original's
on evaluation sentences the calibration and the choice never see. Sentences are the standard
library's docstrings by default, or the bench's general prose (``bench/corpus.py``); calibration
and evaluation are the same as ``corpus.splits((calibration, evaluation), seed, corpus)``,
validation comes after them in the shuffle.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from bench.corpus import splits
from bench.paired import SampleScores
from bench.tasks.base import Task


@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, sentences: list[str]) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: masked mean pooling, L2-normalized."""
    device = next(model.parameters()).device
    batch = tokenizer(
        sentences, padding=True, truncation=True, max_length=128, return_tensors="pt"
    ).to(device)
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).float().cpu()


def minilm_task(
    *,
    calibration: int = 16,
    validation: int = 128,
    evaluation: int = 64,
    seed: int = 0,
    corpus: str = "docstrings",
) -> Task:
    """Embedding task: mean cosine to the original's embeddings (higher is better, 1 at best).
    Named ``minilm`` on the docstrings, ``minilm-<corpus>`` on another corpus (cached costs are
    keyed by the name)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hessian_worker import load_model

    loaded = load_model("minilm")
    model, tokenizer = loaded.model.float().eval(), loaded.tokenizer
    calib, evaluation_sents, validation_sents = splits((calibration, evaluation, validation), seed, corpus)
    reference = embed(model, tokenizer, evaluation_sents)

    def samples(m: nn.Module) -> SampleScores:
        return SampleScores((embed(m, tokenizer, evaluation_sents) * reference).sum(-1).double().numpy())

    def score(m: nn.Module) -> float:
        return samples(m).metric()

    return Task(
        name="minilm" if corpus == "docstrings" else f"minilm-{corpus}",
        metric="embedding cosine to the original",
        higher_is_better=True,
        model=model,
        tokenizer=tokenizer,
        distill="cosine",
        calibration=calib,
        validation=validation_sents,
        evaluation=evaluation_sents,
        score=score,
        samples=samples,
    )
