"""Per-image score files (CSV: path, label, one softmax column per class, then ``log_p_label``, the
log-probability of the true class), written at full precision so that reading one back reproduces the
logged metrics exactly ("%.17g" and pandas' round-trip parser: every float64 survives the trip bit for
bit). ``log_p_label`` is there because the loss cannot be taken from a probability that underflowed
to 0: it comes from the float64 log-softmax of the logits."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

LOG_P = "log_p_label"


def scores_to_csv(paths: list[str], labels: np.ndarray, scores: np.ndarray, classes: list[str],
                  log_p_label: np.ndarray | None = None) -> str:
    table = pd.DataFrame(np.asarray(scores, dtype=np.float64), columns=classes)
    table.insert(0, "label", [classes[int(i)] for i in labels])
    table.insert(0, "path", list(paths))
    if log_p_label is not None:
        table[LOG_P] = np.asarray(log_p_label, dtype=np.float64)
    return table.to_csv(index=False, float_format="%.17g", lineterminator="\n")


def scores_from_csv(text: str) -> tuple[list[str], np.ndarray, np.ndarray, list[str], np.ndarray | None]:
    """Returns paths, label indices, (n, C) float64 scores, the class names (column order) and the
    true class's log-probabilities (None for a file written without them)."""
    table = pd.read_csv(io.StringIO(text), dtype={"path": str, "label": str}, float_precision="round_trip")
    has_log_p = table.columns[-1] == LOG_P
    classes = list(table.columns[2:-1] if has_log_p else table.columns[2:])
    labels = table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    scores = table[classes].to_numpy(np.float64).reshape(-1, len(classes))
    log_p = table[LOG_P].to_numpy(np.float64) if has_log_p else None
    return list(table["path"]), labels, scores, classes, log_p
