"""The model card of a compressed directory: ``README.md`` and ``sharing.png`` beside the weights.

A user who finds ``out/`` (or its copy on a hub) should learn without running anything what the
model is, how it was shared and how well it does: the source and how to load it, the parameters
kept, a picture of the sharing (layers by family and depth, one colour per class), the plan as a
table, the figures measured at compress time and by ``geoshare evaluate``, and the command.

The card is rendered from plan.json alone, so every save writes it (``companions.write_companions``)
and a re-save of a loaded model writes the same bytes. What only the compress run or an
evaluation knows (the command, the measured figures) is recorded in plan.json's optional ``card``
field by ``write_card`` (CLI ``compress``, whose command line geoshare.cli.record rebuilds, and
``evaluate --card``), which travels with the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hessian_worker.discovery import split_block_name

README = "README.md"
PICTURE = "sharing.png"
CARD = "card"  # the plan.json field with the command and the measured figures
# CompressReport fields worth a line on the card
_COMPRESS_FIELDS = ("chosen", "merge", "unique_params", "params_ratio", "predicted_loss_change", "measured_loss_change")

# what a class shares, by scheme: in the picture's title and in the card's heading
SHARED = {"tie": "tensor", "basis": "basis", "relaxed": "tensor (plus a low-rank correction each)"}
SHARING = {"tie": "weights", "basis": "low-rank bases", "relaxed": "weights with a low-rank correction per layer"}


def write_card(out: str | Path, *, report: Mapping[str, Any] | None = None, command: str | None = None,
               evaluation: Mapping[str, Any] | None = None) -> Path:
    """Writes ``out/README.md`` and ``out/sharing.png`` from ``out/plan.json``; ``report`` (a
    CompressReport as JSON), ``command`` and ``evaluation`` (an EvaluationReport as JSON) are first
    recorded in plan.json's ``card`` field, beside what an earlier call recorded.

    Returns:
        the README's path.
    """
    folder = Path(out)
    plan_path = folder / "plan.json"
    meta = json.loads(plan_path.read_text(encoding="utf-8"))
    card = dict(meta.get(CARD) or {})
    if command is not None:
        card["command"] = command
    if report is not None:
        card["compress"] = compress_summary(report)
    if evaluation is not None:
        card["evaluation"] = evaluation_summary(evaluation)
    if card != (meta.get(CARD) or {}):
        meta[CARD] = card
        plan_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    rows = sharing_rows(meta)
    if rows:
        draw_sharing(rows, folder / PICTURE, title=f"{meta.get('model_class') or 'model'}: layers sharing a "
                     f"{SHARED.get(meta.get('scheme') or 'tie', 'tensor')} have one colour")
    (folder / README).write_text(render(meta, folder, picture=bool(rows)), encoding="utf-8")
    return folder / README


def compress_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The card's figures of a compress run."""
    out = {k: report[k] for k in _COMPRESS_FIELDS if report.get(k) is not None}
    if report.get("candidates"):
        out["candidates"] = len(report["candidates"])
    heal = report.get("heal")
    if heal:
        out["heal"] = {k: heal[k] for k in ("steps", "best_step") if heal.get(k) is not None}
    return out


def evaluation_summary(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The card's figures of an evaluation (each model's score, storage, disk and peak memory)."""

    def side(figures: Mapping[str, Any]) -> dict[str, Any]:
        memory = figures.get("memory") or {}
        return {"spec": figures["spec"], "score": figures["score"],
                "unique_params": figures["storage"]["unique_params"], "disk_bytes": figures.get("disk_bytes"),
                "load_forward_bytes": memory.get("load_forward_bytes")}

    return {"metric": evaluation["metric"], "samples": evaluation["samples"], "tokens": evaluation.get("tokens"),
            "model": side(evaluation["model"]), "reference": side(evaluation["reference"]),
            "quality": dict(evaluation.get("quality") or {})}


def sharing_rows(meta: Mapping[str, Any]) -> dict[str, dict[int, int]]:
    """Family -> {block index -> class number} of the planned layers (a layer outside a repeated
    block is its own family at index 0)."""
    rows: dict[str, dict[int, int]] = {}
    for name, layer in (meta.get("layers") or {}).items():
        split = split_block_name(name)
        family, index = (split[2], split[1]) if split else (name, 0)
        rows.setdefault(family, {})[index] = int(layer["class"])
    return rows


def _letters(row: Mapping[int, int], sizes: Mapping[int, int]) -> dict[int, str]:
    """Class -> letter within one family, in depth order; a class of one layer gets '.'."""
    letters: dict[int, str] = {}
    for index in sorted(row):
        c = row[index]
        if c not in letters:
            shared = sum(1 for v in letters.values() if v != ".")
            letters[c] = "." if sizes.get(c, 1) < 2 else _letter(shared)
    return letters


def _letter(i: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return alphabet[i] if i < len(alphabet) else f"{alphabet[i // len(alphabet) - 1]}{alphabet[i % len(alphabet)]}"


def _class_sizes(meta: Mapping[str, Any]) -> dict[int, int]:
    return {i: len(c.get("members") or []) for i, c in enumerate(meta.get("classes") or [])}


def draw_sharing(rows: Mapping[str, Mapping[int, int]], path: Path, *, title: str) -> None:
    """The sharing as a grid: one row per family, one column per block, a cell's colour its class
    (grey: a layer of its own), its letter the class within the family."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    palette = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
               "#9c755f", "#86bcb6", "#d37295", "#a0cbe8"]
    indices = sorted({i for row in rows.values() for i in row})
    column = {i: k for k, i in enumerate(indices)}
    families = list(rows)
    sizes: dict[int, int] = {}
    for row in rows.values():
        for c in row.values():
            sizes[c] = sizes.get(c, 0) + 1
    fig = Figure(figsize=(max(4.0, 1.6 + 0.45 * len(indices) + 0.07 * max(len(f) for f in families)),
                          max(1.6, 0.9 + 0.32 * len(families))), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for y, family in enumerate(families):
        letters = _letters(rows[family], sizes)
        order = [c for c in dict.fromkeys(rows[family][i] for i in sorted(rows[family])) if letters[c] != "."]
        for index, c in rows[family].items():
            shared = letters[c] != "."
            colour = palette[order.index(c) % len(palette)] if shared else "#e6e6e6"
            ax.add_patch(Rectangle((column[index] - 0.45, y - 0.4), 0.9, 0.8, facecolor=colour, edgecolor="white"))
            ax.text(column[index], y, letters[c], ha="center", va="center", fontsize=7,
                    color="white" if shared else "#777777")
    ax.set_xlim(-0.6, len(indices) - 0.4)
    ax.set_ylim(len(families) - 0.5, -0.5)
    ax.set_xticks(range(len(indices)), [str(i) for i in indices], fontsize=7)
    ax.set_yticks(range(len(families)), families, fontsize=7)
    ax.set_xlabel("block", fontsize=8)
    ax.set_title(title, fontsize=8)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(length=0)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def render(meta: Mapping[str, Any], folder: Path, *, picture: bool) -> str:
    """The README's markdown."""
    from hessian_worker.weights_file import weight_files

    scheme = meta.get("scheme") or "tie"
    model_class = meta.get("model_class") or "model"
    source = meta.get("source") or {}
    plan = meta.get("plan") or {}
    params = plan.get("params") or {}
    card = meta.get(CARD) or {}
    classes = [c for c in meta.get("classes") or [] if len(c.get("members") or []) >= 2]
    layers = meta.get("layers") or {}
    lines = ["---", "tags:", "- geoshare", "- parameter-sharing", "---", "",
             f"# {model_class}, layers sharing {SHARING.get(scheme, 'weights')} (Geo-Sharing)", ""]
    if source.get("model"):
        lines.append(f"Compressed from `{source['model']}`"
                     + "".join(f" ({name}: sha256 `{digest[:16]}…`)" for name, digest in (source.get("sha256") or {}).items())
                     + ".")
        lines.append("")
    lines += ["Load it with the project's loader (each shared tensor is one Parameter in memory):", "", "```python",
              "from hessian_worker import load_compressed", "", 'model = load_compressed("path/to/this/directory")',
              "```", "",
              "Plain `transformers` `from_pretrained` refuses this directory by name (the shared tensors are stored "
              "once, and it would initialize the missing aliases at random); `geoshare export DIR --format hf -o "
              "dense/` writes a standard checkpoint with every tensor materialized.", "",
              "## Parameters", "", "| | |", "|---|---|"]
    lines.append(f"| unique parameters stored | {meta.get('unique_params', 0):,} |")
    if params.get("original"):
        lines.append(f"| shareable parameters kept | {params.get('shared', 0):,} of {params['original']:,} "
                     f"({params.get('shared', 0) / params['original']:.3f}) |")
    lines.append(f"| classes sharing | {len(classes)} over {sum(len(c['members']) for c in classes)} of "
                 f"{len(layers)} planned layers ({scheme} scheme) |")
    alone = sum(bool(spec.get("alone")) for spec in (meta.get("relaxed") or {}).values())
    if alone:
        lines.append(f"| layers stored alone | {alone} (low-rank factors of their own, no shared tensor) |")
    if scheme != "basis" and meta.get("basis"):  # basis families beside another scheme's (relaxed plans)
        lines.append(f"| layers on shared bases | {len(meta['basis'])} (a low-rank basis per class, "
                     "coefficients of their own) |")
    weights = weight_files(folder)
    if weights:
        lines.append(f"| weights on disk | {sum(f.stat().st_size for f in weights) / 1e6:.1f} MB |")
    lines.append("")
    rows = sharing_rows(meta)
    if rows:
        lines += ["## Sharing", ""]
        if picture:
            lines += [f"![sharing]({PICTURE})", ""]
        sizes = _class_sizes(meta)
        lines += ["Each family's layers in depth order; one letter per class that shares, `.` for a layer of its own.",
                  "", "| family | layers | shared classes | layers by class |", "|---|---|---|---|"]
        for family, row in rows.items():
            letters = _letters(row, sizes)
            shared = {c for c in row.values() if letters[c] != "."}
            lines.append(f"| `{family}` | {len(row)} | {len(shared)} | `{''.join(letters[row[i]] for i in sorted(row))}` |")
        lines.append("")
    lines += _measured(card)
    if card.get("command"):
        lines += ["## Command", "", "```", card["command"], "```", ""]
    lines += ["Written by Geo-Sharing (`hessian_worker.model_card`) from `plan.json`, which holds the plan, the alias "
              "map and the manifest of the sharing.", ""]
    return "\n".join(lines)


def _measured(card: Mapping[str, Any]) -> list[str]:
    """The measured figures: the compress run's and the last evaluation's."""
    lines: list[str] = []
    run = card.get("compress")
    if run:
        lines += ["## Measured at compress time", "", "| | |", "|---|---|"]
        labels = {"chosen": "plan chosen", "merge": "merge", "candidates": "candidate plans measured",
                  "predicted_loss_change": "predicted loss change", "params_ratio": "shareable parameters kept",
                  "measured_loss_change": "measured loss change (held-out samples)", "unique_params": "unique parameters"}
        for key, label in labels.items():
            if key in run:
                value = run[key]
                text = f"{value:.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
                lines.append(f"| {label} | {text} |")
        if run.get("heal"):
            lines.append(f"| healing | {run['heal'].get('steps')} steps, best at step {run['heal'].get('best_step')} |")
        lines.append("")
    ev = card.get("evaluation")
    if ev:
        m, r = ev["model"], ev["reference"]
        tokens = f", {ev['tokens']:,} tokens" if ev.get("tokens") else ""
        lines += [f"## Evaluation (`geoshare evaluate`, {ev['samples']} samples{tokens})", "",
                  f"| | this model | reference (`{r['spec']}`) |", "|---|---|---|",
                  f"| {ev['metric']} | {m['score']:.4f} | {r['score']:.4f} |",
                  f"| unique parameters (storage) | {m['unique_params']:,} | {r['unique_params']:,} |"]
        for key, label in (("disk_bytes", "weights on disk"), ("load_forward_bytes", "peak memory, load + one forward")):
            if m.get(key) is not None and r.get(key) is not None:
                lines.append(f"| {label} | {m[key] / 1e6:.1f} MB | {r[key] / 1e6:.1f} MB |")
        lines += [f"| {k.replace('_', ' ')} | {v:.4g} | |" for k, v in ev.get("quality", {}).items()]
        lines.append("")
    return lines
