"""The report's view of ``tzk eval`` results: ``RUN/eval/*.json`` as tables and matrices.

Each file holds what ``tzk eval --json`` prints (:mod:`tzkcli.evaluation.evaluate`): bpd under
``p_0`` and by condition with the knowledge gain, accuracy and confusion per kind, OOD AUROC,
and the accuracy of the model's classifier on its own samples.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from tzkcli.errors import BadInputError
from tzkcli.report import figures, page

EVAL_DIR = "eval"
MAX_MATRIX = 60


def read_eval_results(run: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every ``RUN/eval/*.json``, oldest first.

    Raises:
        BadInputError: a file that is not a JSON object with a ``bpd`` table.
    """
    folder = Path(run) / EVAL_DIR
    found = []
    paths = list(folder.glob("*.json")) if folder.is_dir() else []
    paths.sort(key=lambda p: (p.stat().st_mtime, p.name))
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise BadInputError(f"{path}: unreadable or not JSON ({error})") from None
        if not isinstance(data, dict) or not isinstance(data.get("bpd"), dict):
            raise BadInputError(f"{path}: no 'bpd' table; expected results written by tzk eval")
        found.append((path, data))
    return found


def eval_parts(path: Path, result: dict[str, Any]) -> list[str]:
    """The HTML of one evaluation: headline, bpd table, classification, OOD, confusion."""
    parts = [f"<h3>{html.escape(_title(path, result))}</h3>", _headline(result),
             _bpd_table(result)]
    parts.extend(_classification(result))
    parts.extend(_ood(result))
    return parts


def confusion_parts(path: Path, result: dict[str, Any]) -> list[str]:
    """One confusion-matrix figure per kind of one evaluation."""
    parts = []
    for kind, record in (result.get("confusion") or {}).items():
        values = record.get("values") or []
        if "matrix" not in record or not 1 < len(values) <= MAX_MATRIX:
            continue
        accuracy = (result.get("accuracy") or {}).get(kind)
        title = f"{kind}: accuracy {accuracy:.3f}" if accuracy is not None else kind
        png = figures.confusion_matrix(np.array(record["matrix"]), values, title)
        parts.append(page.image(png, f"confusion matrix of {kind}",
                                f"{_title(path, result)}: {kind}, rows true, columns "
                                "predicted by argmax of the posterior", plot=True))
    return parts


def _title(path: Path, result: dict[str, Any]) -> str:
    store = Path(str(result.get("store", "?"))).name
    return (f"{result.get('checkpoint', path.stem)} on {store}, split "
            f"{result.get('split') or 'all'}")


def _headline(result: dict[str, Any]) -> str:
    bpd = result["bpd"]
    parts = bpd.get("parts") or {}
    return page.paragraph(
        f"{result.get('images', 0):,} images · bpd under p_0 {_f(bpd.get('joint'))} = prior "
        f"{_f(parts.get('prior'))} + ladj {_f(parts.get('ladj'))} + dequantisation "
        f"{parts.get('dequantisation', '?')} · n_bits {result.get('n_bits')}, "
        f"{result.get('dequantisation', 'uniform')} dequantisation, D = {result.get('dims')}")


def _bpd_table(result: dict[str, Any]) -> str:
    rows = []
    for spec, row in (result["bpd"].get("by_condition") or {}).items():
        gain = row.get("gain")
        tone = None if gain is None else ("good" if gain > 0 else "bad")
        rows.append([spec, row.get("n"), row.get("joint"), row.get("conditional"),
                     page.cell(gain, tone=tone)])
    return page.table(["condition", "images", "bpd p_0", "bpd own prior", "knowledge gain"],
                      rows)


def _classification(result: dict[str, Any]) -> list[str]:
    accuracy = result.get("accuracy") or {}
    if not accuracy:
        return []
    sampled = result.get("sample_accuracy") or {}
    rows = [[kind, page.cell(value, 3), page.cell((sampled.get(kind) or {}).get("mean"), 3)]
            for kind, value in accuracy.items()]
    return [page.table(["kind", "accuracy (posterior argmax)", "accuracy on own samples"],
                       rows)]


def _ood(result: dict[str, Any]) -> list[str]:
    ood = result.get("ood_auroc") or {}
    if not ood:
        return []
    rows = [[Path(name).name, row.get("images"), page.cell(row.get("bpd_joint")),
             page.cell(row.get("log_p0"), 3), page.cell(row.get("knowledge"), 3)]
            for name, row in ood.items()]
    return [page.paragraph("Out of distribution: AUROC separating this split (in) from a store "
                           "the model never saw (out); 1 separates, 0.5 is chance, below 0.5 "
                           "rates the unseen images higher."),
            page.table(["unseen store", "images", "its bpd p_0", "AUROC by log p_0",
                        "AUROC by knowledge score"], rows)]


def _f(value: Any) -> str:
    return "?" if not isinstance(value, (int, float)) else f"{value:.4f}"
