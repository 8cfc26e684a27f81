"""Layer discovery: which weight tensors may share, grouped into families.

A family is one role in a stack of repeated blocks (``encoder.layer.{i}.attention.self.query.weight``
-> family ``attention.self.query.weight``, index ``i``). Only same-family layers ever share, so a
family also fixes one tensor shape. The matcher that reads user patterns lives here too, so every
place that selects parameters by name agrees on what a pattern means.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from hessian_worker.errors import DiscoveryError

REGEX_PREFIX = "re:"


class Matcher:
    """Selects parameter names by full name, module prefix, or ``re:`` regex (full match).

    A plain pattern matches the name itself or any name under it as a module path
    (``encoder.layer.0`` matches ``encoder.layer.0.output.dense.weight``), so users can name a
    module or a tensor. ``re:`` patterns must match the whole name, so ``re:.*query.*`` is explicit
    about where it may float.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = list(patterns)
        self._plain: list[str] = []
        self._regex: list[re.Pattern[str]] = []
        for pattern in self.patterns:
            if pattern.startswith(REGEX_PREFIX):
                try:
                    self._regex.append(re.compile(pattern[len(REGEX_PREFIX) :]))
                except re.error as exc:
                    raise DiscoveryError(f"bad regex pattern {pattern!r}: {exc}") from exc
            else:
                self._plain.append(pattern)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def matches(self, name: str) -> bool:
        """True when any pattern selects ``name``."""
        for plain in self._plain:
            if name == plain or name.startswith(plain + "."):
                return True
        return any(rx.fullmatch(name) for rx in self._regex)

    def unused(self, names: Iterable[str]) -> list[str]:
        """Patterns that select none of ``names`` (almost always a typo worth reporting)."""
        names = list(names)
        return [p for p in self.patterns if not Matcher([p]).matches_any(names)]

    def matches_any(self, names: Iterable[str]) -> bool:
        return any(self.matches(n) for n in names)


@dataclass(frozen=True)
class LayerInfo:
    """One shareable tensor: its full parameter name, family, depth index and shape."""

    name: str
    family: str
    index: int
    shape: tuple[int, ...]

    @property
    def params(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def split_block_name(name: str) -> tuple[str, int, str] | None:
    """``encoder.layer.3.attention.self.query.weight`` -> (``encoder.layer``, 3, ``attention.self.query.weight``).

    The block index is the first all-digit component that has something after it.
    """
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:i]), int(part), ".".join(parts[i + 1 :])
    return None


def discover_layers(
    model: nn.Module,
    targets: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
    families: Mapping[str, str] | None = None,
    *,
    min_members: int = 2,
) -> list[LayerInfo]:
    """Group a model's shareable weights into families of repeated blocks.

    By default only 2-D weights inside numbered blocks count (biases and norms are tiny and
    sharing them saves nothing). ``targets`` replaces that default with explicit patterns (any
    rank), ``ignore`` removes names, and ``families`` maps patterns to custom family names for
    models whose naming has no block index (the index is then the first number in the name, or
    the order of appearance). A family needs ``min_members`` tensors of one shape.

    Raises:
        DiscoveryError: a pattern matched nothing, or no family was found.
    """
    target_m = Matcher(targets or [])
    ignore_m = Matcher(ignore or [])
    family_ms = [(Matcher([pat]), fam) for pat, fam in (families or {}).items()]
    named = list(model.named_parameters())
    all_names = [n for n, _ in named]
    bad = target_m.unused(all_names)
    if bad:
        raise DiscoveryError(
            f"targets patterns match no parameter: {bad}; parameter names look like "
            f"{all_names[:3]} (use full names or 're:' regexes)"
        )
    unused_ignore = ignore_m.unused(all_names)
    if unused_ignore:
        # an ignore list is often shared across models, so a miss is worth a warning, not an error
        warnings.warn(f"ignore patterns match no parameter: {unused_ignore}", stacklevel=2)
    for matcher, fam in family_ms:
        if not matcher.matches_any(all_names):
            raise DiscoveryError(f"families pattern {matcher.patterns[0]!r} (-> {fam!r}) matches no parameter")

    # group key (container prefix, role suffix, shape) -> members (index, name)
    groups: dict[tuple[str, str, tuple[int, ...]], list[tuple[int, str]]] = defaultdict(list)
    custom_order: dict[str, int] = defaultdict(int)
    for name, param in named:
        if ignore_m.matches(name):
            continue
        shape = tuple(param.shape)
        custom = next((fam for m, fam in family_ms if m.matches(name)), None)
        if custom is not None:
            num = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
            index = int(num.group(1)) if num else custom_order[custom]
            custom_order[custom] += 1
            groups[("", custom, shape)].append((index, name))
            continue
        parts = split_block_name(name)
        if parts is None:
            continue
        if target_m:
            if not target_m.matches(name):
                continue
        elif param.ndim != 2:
            continue
        prefix, index, suffix = parts
        groups[(prefix, suffix, shape)].append((index, name))

    groups = {k: sorted(v) for k, v in groups.items() if len(v) >= min_members}
    if not groups:
        raise DiscoveryError(
            "no shareable family found: need at least "
            f"{min_members} same-shape weights in numbered blocks (names like 'layers.0.fc.weight'); "
            "pass targets=[...] or families={pattern: family} for other naming"
        )
    # a family is named by its role; prefix it with the container or shape only when ambiguous
    by_suffix: dict[str, list[tuple[str, str, tuple[int, ...]]]] = defaultdict(list)
    for key in groups:
        by_suffix[key[1]].append(key)
    layers: list[LayerInfo] = []
    for suffix, keys in by_suffix.items():
        prefixes = {k[0] for k in keys}
        for key in keys:
            prefix, _, shape = key
            fam = suffix
            if len(prefixes) > 1 and prefix:
                fam = f"{prefix}.{suffix}"
            if sum(1 for k in keys if k[0] == prefix) > 1:
                fam = f"{fam}[{'x'.join(map(str, shape))}]"
            layers.extend(LayerInfo(name, fam, index, shape) for index, name in groups[key])
    order = {n: i for i, n in enumerate(all_names)}
    layers.sort(key=lambda layer: order[layer.name])
    return layers
