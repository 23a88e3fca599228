"""Per-image score files (CSV: path, label, one softmax column per class), written at full precision
so that reading one back reproduces the logged metrics exactly."""

from __future__ import annotations

import csv
import io

import numpy as np


def scores_to_csv(paths: list[str], labels: np.ndarray, scores: np.ndarray, classes: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", *classes])
    for path, label, row in zip(paths, labels, scores):
        # repr() of a float64 round-trips exactly
        writer.writerow([path, classes[int(label)], *(repr(float(v)) for v in row)])
    return buf.getvalue()


def scores_from_csv(text: str) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """Returns paths, label indices, (n, C) float64 scores and the class names (column order)."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    classes = header[2:]
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, rows = [], [], []
    for row in reader:
        paths.append(row[0])
        labels.append(index[row[1]])
        rows.append([float(v) for v in row[2:]])
    return paths, np.array(labels, dtype=np.int64), np.array(rows, dtype=np.float64).reshape(-1, len(classes)), classes
