"""A residual MLP on scikit-learn's digits: a classification task that trains in seconds.

The 8x8 digit images ship with scikit-learn (no download). One fixed seeded partition gives a
training part, a held-out pool and a test part; ``seed`` draws calibration and validation from the
pool, so the model (trained on the training part only) is the same for every seed and never saw
any of the data the strategies are calibrated, chosen or scored on. Blocks are named
``blocks.{i}.fc_in`` / ``blocks.{i}.fc_out`` so discovery finds one family per role.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from bench.paired import SampleScores
from bench.tasks.base import Task
from bench.tasks.cache import load_or_train

CLASSES = 10
PARTITION_SEED = 0  # fixes train / pool / test; the task's seed only samples from the pool
TEST, POOL = 360, 360  # of 1,797 images; the other 1,077 train the model


@dataclass(frozen=True)
class DigitsConfig:
    blocks: int = 6
    width: int = 64
    hidden: int = 128


@dataclass(frozen=True)
class DigitsTrain:
    epochs: int = 40
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-2
    seed: int = 0


class ResidualBlock(nn.Module):
    """x + fc_out(gelu(fc_in(norm(x)))): equal width in and out, so blocks repeat."""

    def __init__(self, config: DigitsConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.width)
        self.fc_in = nn.Linear(config.width, config.hidden)
        self.fc_out = nn.Linear(config.hidden, config.width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc_out(F.gelu(self.fc_in(self.norm(x))))


class DigitsNet(nn.Module):
    """Pixels [n, 64] in [0, 1] -> class logits [n, 10]."""

    def __init__(self, config: DigitsConfig) -> None:
        super().__init__()
        self.stem = nn.Linear(64, config.width)
        self.blocks = nn.ModuleList(ResidualBlock(config) for _ in range(config.blocks))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@lru_cache(maxsize=1)
def dataset() -> tuple[Tensor, Tensor]:
    """All 1,797 images (pixels scaled to [0, 1]) and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(
        data.target, dtype=torch.long
    )


def partition() -> dict[str, Tensor]:
    """{"train", "pool", "test"}: disjoint fixed index sets into ``dataset()``."""
    perm = torch.randperm(
        len(dataset()[1]), generator=torch.Generator().manual_seed(PARTITION_SEED)
    )
    return {"test": perm[:TEST], "pool": perm[TEST : TEST + POOL], "train": perm[TEST + POOL :]}


def pool_samples(calibration: int, validation: int, seed: int) -> tuple[Tensor, Tensor]:
    """Disjoint seeded (calibration, validation) index sets drawn from the held-out pool.

    Raises:
        ValueError: they need more images than the pool holds.
    """
    if calibration + validation > POOL:
        raise ValueError(
            f"calibration + validation = {calibration + validation} exceeds the pool of {POOL} images"
        )
    pool = partition()["pool"]
    order = pool[torch.randperm(POOL, generator=torch.Generator().manual_seed(seed))]
    return order[:calibration], order[calibration : calibration + validation]


@torch.no_grad()
def correct(model: nn.Module, x: Tensor, y: Tensor) -> SampleScores:
    """1 for each sample the model classifies right, 0 else: the accuracy in per-sample parts."""
    param = next(model.parameters())
    pred = model(x.to(device=param.device, dtype=param.dtype)).argmax(dim=-1).cpu()
    return SampleScores((pred == y).double().numpy())


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return correct(model, x, y).metric()


def train_digits(
    model: DigitsNet, train: DigitsTrain, x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor
) -> dict[str, float]:
    """Minibatch AdamW with cosine decay; test accuracy before and after, and the wall time."""
    torch.manual_seed(train.seed)
    gen = torch.Generator().manual_seed(train.seed)
    before = accuracy(model.eval(), x_test, y_test)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    steps_per_epoch = -(-len(y) // train.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, train.epochs * steps_per_epoch)
    start = time.perf_counter()
    model.train()
    for _ in tqdm(range(train.epochs), desc="train digits"):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), train.batch_size):
            idx = order[i : i + train.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - start
    model.eval()
    return {
        "train_seconds": round(seconds, 1),
        "accuracy_before": before,
        "accuracy_after": accuracy(model, x_test, y_test),
    }


def build_digits(*, cache_dir: Path | None = None) -> tuple[DigitsNet, dict]:
    """The trained model (from the cache when there) and its training record."""
    config, train = DigitsConfig(), DigitsTrain()
    (x, y), parts = dataset(), partition()
    torch.manual_seed(train.seed)
    model = DigitsNet(config)
    settings = {
        "model": asdict(config),
        "train": asdict(train),
        "partition": [PARTITION_SEED, TEST, POOL],
    }
    record = load_or_train(
        "digits",
        settings,
        model,
        lambda m: train_digits(
            m, train, x[parts["train"]], y[parts["train"]], x[parts["test"]], y[parts["test"]]
        ),
        cache_dir,
    )
    return model.eval(), record


def digits_task(
    *, calibration: int = 128, validation: int = 200, seed: int = 0, cache_dir: Path | None = None
) -> Task:
    """Classification task: test accuracy (higher is better) of a compressed copy.

    Raises:
        ValueError: calibration + validation exceed the held-out pool.
    """
    calib_idx, valid_idx = pool_samples(calibration, validation, seed)
    model, _ = build_digits(cache_dir=cache_dir)
    (x, y), test = dataset(), partition()["test"]
    x_test, y_test = x[test], y[test]
    return Task(
        name="digits",
        metric="test accuracy",
        higher_is_better=True,
        model=model,
        tokenizer=None,
        distill="kl",
        calibration=x[calib_idx],
        validation=x[valid_idx],
        evaluation=x_test,
        score=lambda m: accuracy(m, x_test, y_test),
        heal_lr=1e-4,
        samples=lambda m: correct(m, x_test, y_test),
    )
