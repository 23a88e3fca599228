"""Per-image score files (CSV: path, label, one softmax column per class), written at full precision
so that reading one back reproduces the logged metrics exactly ("%.17g" and pandas' round-trip
parser: every float64 survives the trip bit for bit)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd


def scores_to_csv(paths: list[str], labels: np.ndarray, scores: np.ndarray, classes: list[str]) -> str:
    table = pd.DataFrame(np.asarray(scores, dtype=np.float64), columns=classes)
    table.insert(0, "label", [classes[int(i)] for i in labels])
    table.insert(0, "path", list(paths))
    return table.to_csv(index=False, float_format="%.17g", lineterminator="\n")


def scores_from_csv(text: str) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """Returns paths, label indices, (n, C) float64 scores and the class names (column order)."""
    table = pd.read_csv(io.StringIO(text), dtype={"path": str, "label": str}, float_precision="round_trip")
    classes = list(table.columns[2:])
    labels = table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    scores = table[classes].to_numpy(np.float64).reshape(-1, len(classes))
    return list(table["path"]), labels, scores, classes
