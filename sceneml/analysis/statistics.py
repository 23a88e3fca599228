"""Streaming statistics: memory does not grow with the number of images (no feature map outlives its batch).

- :class:`RunningMoments`: mean and std of a scalar per image;
- :class:`RunningCovariance`: the covariance of vectors, merged batch by batch (Chan et al.);
- :func:`eigen_spectrum`: eigenvalues of that covariance, largest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sceneml.errors import SceneMLError


@dataclass
class RunningMoments:
    """Mean and std of a scalar per image, from a count, a sum and a sum of squares."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        self.n += values.size
        self.total += float(values.sum())
        self.total_sq += float(np.square(values).sum())

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof=1)."""
        if self.n < 2:
            return float("nan")
        return float(np.sqrt(max(self.total_sq - self.n * self.mean ** 2, 0.0) / (self.n - 1)))


@dataclass
class RunningCovariance:
    """Covariance of vectors, merged batch by batch (Chan et al.): a C-vector mean and a CxC float64
    matrix of summed deviations, whatever the number of vectors."""

    n: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    def add(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch, dtype=np.float64)
        nb = len(batch)
        if nb == 0:
            return
        batch_mean = batch.mean(axis=0)
        centered = batch - batch_mean
        batch_m2 = centered.T @ centered
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, batch_mean, batch_m2
            return
        n = self.n + nb
        delta = batch_mean - self.mean
        self.m2 = self.m2 + batch_m2 + np.outer(delta, delta) * (self.n * nb / n)
        self.mean = self.mean + delta * (nb / n)
        self.n = n

    def covariance(self) -> np.ndarray:
        """Like ``numpy.cov(vectors, rowvar=False)`` (ddof=1)."""
        if self.n < 2:
            raise SceneMLError("a covariance needs at least 2 images")
        return self.m2 / (self.n - 1)


def eigen_spectrum(covariance: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric matrix, largest first."""
    return np.linalg.eigvalsh(covariance)[::-1].copy()


def top1_share(eigenvalues: np.ndarray) -> float:
    """Largest eigenvalue / trace: how much of the variance one direction carries."""
    total = float(np.sum(eigenvalues))
    return float(eigenvalues[0]) / total if total > 0 else float("nan")
