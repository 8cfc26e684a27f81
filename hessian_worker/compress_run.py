"""``save_compressed_run``: the files a compress run leaves in its directory, written in one place.

``geoshare compress`` and the service's compress jobs (service/analysis_loop.py) both end here,
so ``report.json`` is the same document whichever ran it. What the two leave differs only where
docs/contract.md says so: a compress job writes neither ``problem.json`` nor the card's figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPORT = "report.json"
PROBLEM = "problem.json"


def report_json(report: Any) -> str:
    """``report.json``'s text: the CompressReport without the plan (plan.json holds it) and the costs."""
    return report.model_dump_json(indent=2, exclude={"plan", "problem"})


def save_compressed_run(out: str | Path, report: Any, *, model: Any = None, source: Any = None,
                        costs: bool = True, card: bool = True, command: str | None = None) -> str:
    """Writes a compress run's directory and returns ``report.json``'s text.

    Args:
        out: the directory (created by the save when ``model`` is given).
        report: the run's CompressReport.
        model: the compressed model in memory, saved with ``report.plan`` (``io.save_shared``);
            None when it is on disk already (the streamed path writes it block by block).
        source: the source model's spec, whose config and tokenizer files are copied in.
        costs: also write ``problem.json``, the chosen plan's costs.
        card: also record the run's figures (and ``command``) in the model card
            (``model_card.write_card``).
        command: the command line that made the run, for the card.
    """
    folder = Path(out)
    if model is not None:
        from hessian_worker.io import save_shared

        save_shared(model, report.plan, folder, source=source)
    text = report_json(report)
    (folder / REPORT).write_text(text, encoding="utf-8")
    if costs:
        (folder / PROBLEM).write_text(report.problem.model_dump_json(indent=2), encoding="utf-8")
    if card:
        from hessian_worker.model_card import write_card

        write_card(folder, report=json.loads(text), command=command)  # README.md: the figures, the command
    return text
