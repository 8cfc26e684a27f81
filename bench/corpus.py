"""Offline English text for calibration and evaluation, in two kinds (``CORPORA``).

Nothing may be downloaded, so:

- ``docstrings``: the first paragraph of the docstrings of the standard library's public modules,
  classes and functions: plain technical English, thousands of distinct sentences;
- ``prose``: a few hundred general-prose sentences written for the bench (bench/data/prose.txt):
  everyday topics and vocabulary, a different domain for the cross-domain evaluation.

Calibration and evaluation splits are disjoint and seeded.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import pkgutil
import random
import re
import sys
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

CORPORA = ("docstrings", "prose")
PROSE = Path(__file__).resolve().parent / "data" / "prose.txt"

_MODULES = [
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmath", "codecs",
    "collections", "colorsys", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "enum", "filecmp", "fnmatch", "fractions", "functools", "glob", "gzip",
    "hashlib", "heapq", "hmac", "html", "http", "imaplib", "inspect", "io", "ipaddress", "itertools",
    "json", "logging", "lzma", "mailbox", "math", "mimetypes", "operator", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "sched", "secrets", "shelve", "shlex", "shutil", "signal",
    "smtplib", "socket", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "traceback", "typing",
    "unittest", "urllib", "uuid", "warnings", "wave", "weakref", "xml", "zipfile", "zlib",
]


def _first_sentence(doc: str) -> str | None:
    para = doc.strip().split("\n\n")[0]
    text = re.sub(r"\s+", " ", para).strip()
    if not 40 <= len(text) <= 220 or text.count("(") != text.count(")"):
        return None
    if not text[0].isupper() or ">>>" in text or "::" in text:
        return None
    return text


@lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """Every distinct usable sentence, in a fixed order (independent of import order)."""
    found: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _MODULES:
            try:
                mod = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - a missing optional stdlib module is fine
                continue
            objs = [mod]
            if hasattr(mod, "__path__"):
                for info in pkgutil.iter_modules(mod.__path__, name + "."):
                    if info.name.split(".")[-1].startswith("_") or "test" in info.name:
                        continue
                    try:
                        objs.append(importlib.import_module(info.name))
                    except Exception:  # noqa: BLE001
                        continue
            for m in objs:
                for attr, obj in vars(m).items():
                    if attr.startswith("_"):
                        continue
                    if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj):
                        doc = inspect.getdoc(obj)
                        if doc and (s := _first_sentence(doc)):
                            found.add(s)
                    if inspect.isclass(obj):
                        for meth in vars(obj).values():
                            doc = getattr(meth, "__doc__", None)
                            if isinstance(doc, str) and (s := _first_sentence(doc)):
                                found.add(s)
    return tuple(sorted(found))


@lru_cache(maxsize=1)
def prose_sentences() -> tuple[str, ...]:
    """The written general-prose sentences, one a line (comment lines start with #), sorted."""
    lines = (line.strip() for line in PROSE.read_text(encoding="utf-8").splitlines())
    return tuple(sorted({line for line in lines if line and not line.startswith("#")}))


def corpus_sentences(corpus: str = "docstrings") -> tuple[str, ...]:
    """The sentences of one of ``CORPORA``.

    Raises:
        ValueError: an unknown corpus.
    """
    if corpus == "docstrings":
        return sentences()
    if corpus == "prose":
        return prose_sentences()
    raise ValueError(f"unknown corpus {corpus!r}; valid corpora: {', '.join(CORPORA)}")


def splits(sizes: Sequence[int], seed: int = 0, corpus: str = "docstrings") -> list[list[str]]:
    """Disjoint seeded samples of the given sizes: consecutive slices of one seeded shuffle, so
    the first k splits do not depend on how many more are asked for.

    Raises:
        ValueError: the sizes add up to more sentences than the corpus has, or an unknown corpus.
    """
    pool = list(corpus_sentences(corpus))
    if sum(sizes) > len(pool):
        raise ValueError(f"asked for {sum(sizes)} sentences, the {corpus} corpus has {len(pool)}")
    random.Random(seed).shuffle(pool)
    ends = list(itertools.accumulate(sizes))
    return [pool[end - size : end] for size, end in zip(sizes, ends, strict=True)]


def split(calibration: int, evaluation: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint seeded samples: (calibration sentences, evaluation sentences)."""
    calib, evaluation_ = splits((calibration, evaluation), seed)
    return calib, evaluation_


if __name__ == "__main__":
    s = sentences()
    print(f"{len(s)} sentences (python {sys.version.split()[0]}); e.g.:")
    for x in split(3, 0)[0]:
        print(" -", x)
