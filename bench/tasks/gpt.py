"""A small byte-level GPT trained here on the standard library's source: a causal-LM task.

Nothing may be downloaded, so the model is trained from scratch on the ``.py`` files of the
running Python's standard library (bytes as tokens: no tokenizer). Whole files are held out for
validation and evaluation, so the reported perplexity is on code the model never saw. Attention
is written out (no fused SDPA kernel) so forward-mode JVPs and double backward work on CPU, and
the blocks are named ``blocks.{i}.attn.qkv`` ... so discovery finds one family per role.
"""

from __future__ import annotations

import math
import sysconfig
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from bench.paired import SampleScores
from bench.tasks.base import Task
from bench.tasks.cache import load_or_train
from hessian_worker.data import INPUT_KEY
from hessian_worker.llm.blocks import ModuleBlocks

VOCAB = 256  # bytes


@dataclass(frozen=True)
class GPTConfig:
    blocks: int = 8
    d_model: int = 128
    heads: int = 4
    mlp_ratio: int = 4
    context: int = 128


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    seed: int = 0


FULL = (GPTConfig(), TrainConfig())
QUICK = (
    GPTConfig(blocks=4, d_model=64, heads=4, context=64),
    TrainConfig(steps=1000, batch_size=16),
)


class Attention(nn.Module):
    """Causal multi-head self-attention with explicit matmuls (differentiable in every mode)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)
        causal = torch.ones(config.context, config.context, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
        y = scores.softmax(dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(n, t, d))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.fc_out = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = Attention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token ids [n, t] (t <= context) -> next-byte logits [n, t, 256]."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(VOCAB, config.d_model)
        self.pos_emb = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.blocks))
        self.ln_f = nn.LayerNorm(config.d_model)
        # untied from tok_emb: 32k parameters, and no tied tensors outside the plan to save/load
        self.head = nn.Linear(config.d_model, VOCAB, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2's init: N(0, 0.02), residual projections shrunk by depth so the stream starts small
        for name, p in self.named_parameters():
            if p.ndim == 2:
                residual = name.endswith(("attn.out.weight", "fc_out.weight"))
                nn.init.normal_(
                    p, std=0.02 / math.sqrt(2 * self.config.blocks) if residual else 0.02
                )
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok_emb(ids) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# --- data -------------------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files in a fixed order, without tests and site-packages
    (test files are full of odd literals that are not representative code)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        f
        for f in root.rglob("*.py")
        if not any("test" in part or part == "site-packages" for part in f.relative_to(root).parts)
    ]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def file_splits() -> dict[str, list[Path]]:
    """Train / validation / evaluation files: every 20th file (two offsets) is held out for each
    held-out split, so all three cover the whole library and share no file."""
    parts: dict[str, list[Path]] = {"train": [], "validation": [], "evaluation": []}
    for i, f in enumerate(stdlib_files()):
        parts[{7: "validation", 17: "evaluation"}.get(i % 20, "train")].append(f)
    return parts


# Two kinds of source for the cross-domain evaluation, by top-level module: text and data formats
# (parsers, formatters, encodings of text) and systems code (networking, processes, files, OS).
SOURCES: dict[str, frozenset[str]] = {
    "text": frozenset(
        ["email", "xml", "html", "json", "csv", "re", "string", "textwrap", "difflib", "mailbox", "configparser", "tomllib", "argparse", "optparse", "getopt", "shlex", "tokenize", "locale", "gettext", "codecs", "base64", "quopri", "uu", "plistlib", "pprint", "calendar", "_strptime", "mimetypes", "stringprep", "_markupbase", "fileinput", "netrc", "reprlib", "xdrlib", "datetime", "fractions", "statistics", "_pydecimal"]
    ),
    "system": frozenset(
        ["asyncio", "multiprocessing", "concurrent", "http", "urllib", "socket", "socketserver", "ssl", "selectors", "subprocess", "os", "shutil", "pathlib", "tempfile", "threading", "queue", "sched", "signal", "ftplib", "smtplib", "imaplib", "poplib", "nntplib", "telnetlib", "xmlrpc", "wsgiref", "ipaddress", "platform", "sysconfig", "glob", "fnmatch", "posixpath", "ntpath", "genericpath", "stat", "getpass", "pty", "tty", "zipfile", "tarfile", "gzip", "bz2", "lzma", "_compression", "shelve", "dbm", "webbrowser", "asyncore", "asynchat", "smtpd", "venv", "uuid"]
    ),
}


def source_of(path: Path) -> str | None:
    """The kind of source (a key of SOURCES) of a standard-library file, or None."""
    top = path.relative_to(Path(sysconfig.get_paths()["stdlib"])).parts[0].removesuffix(".py")
    return next((kind for kind, modules in SOURCES.items() if top in modules), None)


def source_files(source: str | None = None) -> dict[str, list[Path]]:
    """``file_splits`` kept to the files of one kind of ``SOURCES`` (None: every file), so a
    source's held-out files are still ones the model never trained on.

    Raises:
        ValueError: an unknown source.
    """
    if source is None:
        return file_splits()
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")
    return {k: [f for f in files if source_of(f) == source] for k, files in file_splits().items()}


@cache
def streams(source: str | None = None) -> dict[str, Tensor]:
    """Each split's files (``source_files(source)``) as one byte stream (files joined by a blank line)."""
    return {
        k: torch.frombuffer(bytearray(b"".join(f.read_bytes() + b"\n\n" for f in files)), dtype=torch.uint8).long()
        for k, files in source_files(source).items()
    }


def windows(stream: Tensor, n: int, length: int, seed: int) -> Tensor:
    """``n`` distinct non-overlapping seeded windows of ``length`` tokens: [n, length].

    Raises:
        ValueError: the stream holds fewer than ``n`` windows.
    """
    count = len(stream) // length
    if n > count:
        raise ValueError(f"asked for {n} windows of {length} tokens; the stream holds {count}")
    starts = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:n] * length
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def unigram_perplexity(train: Tensor, ids: Tensor) -> float:
    """Perplexity of the training byte frequencies (add-one smoothed) on ``ids``' next tokens: the
    floor a model that learned anything about context must beat."""
    counts = torch.bincount(train, minlength=VOCAB).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-float(logp[ids[:, 1:]].mean()))


# --- training and scoring ---------------------------------------------------------------------


@torch.no_grad()
def window_nll(model: nn.Module, ids: Tensor, batch_size: int = 32) -> SampleScores:
    """Each window's next-token NLL summed over every position after the first, over its token
    count, link exp: the perplexity in per-window parts."""
    device = next(model.parameters()).device
    sums = []
    for i in range(0, len(ids), batch_size):
        x = ids[i : i + batch_size].to(device)
        logits = model(x)[:, :-1].double()
        nll = F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="none")
        sums.append(nll.view(len(x), -1).sum(-1).cpu())
    tokens = torch.full((len(ids),), ids.shape[1] - 1, dtype=torch.float64)
    return SampleScores(torch.cat(sums).numpy(), tokens.numpy(), exp=True)


def perplexity(model: nn.Module, ids: Tensor, batch_size: int = 32) -> float:
    """exp(mean next-token NLL) over every position after the first of each row."""
    return window_nll(model, ids, batch_size).metric()


def train_gpt(model: GPT, train: TrainConfig, stream: Tensor, held_out: Tensor) -> dict[str, float]:
    """AdamW with warmup and cosine decay on random windows; perplexity on ``held_out`` before and
    after, and the wall time."""
    torch.manual_seed(train.seed)
    gen = torch.Generator().manual_seed(train.seed)
    before = perplexity(model.eval(), held_out)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": train.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=train.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < train.warmup:
            return (step + 1) / train.warmup
        return 0.5 * (
            1 + math.cos(math.pi * (step - train.warmup) / max(1, train.steps - train.warmup))
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t = model.config.context
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(train.steps), desc="train gpt")
    for _ in bar:
        offsets = torch.randint(len(stream) - t - 1, (train.batch_size,), generator=gen)
        rows = torch.stack([stream[o : o + t + 1] for o in offsets.tolist()])
        logits = model(rows[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), rows[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    seconds = time.perf_counter() - start
    model.eval()
    return {
        "train_seconds": round(seconds, 1),
        "perplexity_before": before,
        "perplexity_after": perplexity(model, held_out),
    }


def build_gpt(*, quick: bool = False, cache_dir: Path | None = None) -> tuple[GPT, dict]:
    """The trained model (from the cache when there) and its training record."""
    config, train = QUICK if quick else FULL
    data = streams()
    torch.manual_seed(train.seed)
    model = GPT(config)
    held_out = windows(data["validation"], 64, config.context, seed=0)
    settings = {
        "model": asdict(config),
        "train": asdict(train),
        "files": len(stdlib_files()),
        "train_bytes": len(data["train"]),
    }
    record = load_or_train(
        "gpt-quick" if quick else "gpt",
        settings,
        model,
        lambda m: train_gpt(m, train, data["train"], held_out),
        cache_dir,
    )
    return model.eval(), record


def gpt_task(
    *,
    quick: bool = False,
    calibration: int = 16,
    validation: int = 64,
    evaluation: int = 64,
    seed: int = 0,
    cache_dir: Path | None = None,
    source: str | None = None,
) -> Task:
    """Causal LM task: held-out perplexity (lower is better) of a compressed copy.

    Calibration windows come from the training files (what a user compressing a model holds),
    validation and evaluation windows from their own held-out files; ``seed`` draws the windows,
    the model itself is fixed by its settings. ``source`` (a key of ``SOURCES``) keeps every split
    to one kind of code (the model is the same, trained on all of it); the task is then named
    ``gpt-<source>`` (cached costs are keyed by the name).
    """
    model, _ = build_gpt(quick=quick, cache_dir=cache_dir)
    data, t = streams(source), model.config.context
    evaluation_ids = windows(data["evaluation"], evaluation, t, seed)
    return Task(
        name="gpt" if source is None else f"gpt-{source}",
        metric="held-out perplexity",
        higher_is_better=False,
        model=model,
        tokenizer=None,
        distill="kl",
        calibration=windows(data["train"], calibration, t, seed),
        validation=windows(data["validation"], validation, t, seed),
        evaluation=evaluation_ids,
        score=lambda m: perplexity(m, evaluation_ids),
        heal_lr=3e-4,
        samples=lambda m: window_nll(m, evaluation_ids),
    )


def gpt_blocks(model: GPT) -> ModuleBlocks:
    """The GPT seen block by block (``hessian_worker.llm.blocks``): the streamed analysis and
    compress run on it as on a checkpoint, and are checked against the in-memory path here."""

    def embed(batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        ids = batch[INPUT_KEY]
        return model.tok_emb(ids) + model.pos_emb(torch.arange(ids.shape[1], device=ids.device)), {}

    def head(hidden: Tensor, mask: Tensor | None) -> Tensor:
        return model.head(model.ln_f(hidden))

    return ModuleBlocks(model, "blocks", embed, head, per_token=True)
