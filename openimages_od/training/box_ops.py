"""Pairwise box overlaps for the metrics and the error analysis, pure numpy.

Boxes are ``[ymin, xmin, ymax, xmax]`` rows in any consistent unit; degenerate boxes have
area 0 and overlap nothing.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ioa_matrix", "iou_matrix"]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between every box of ``a`` [n, 4] and ``b`` [m, 4] -> [n, m]."""
    inter = _intersection(a, b)
    area_a = _area(a)[:, None]
    area_b = _area(b)[None, :]
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def ioa_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over the area of ``a`` (detections) for every pair -> [n, m]."""
    inter = _intersection(a, b)
    area_a = _area(a)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(area_a > 0, inter / area_a, 0.0)


def _area(x: np.ndarray) -> np.ndarray:
    return np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ymin = np.maximum(a[:, None, 0], b[None, :, 0])
    xmin = np.maximum(a[:, None, 1], b[None, :, 1])
    ymax = np.minimum(a[:, None, 2], b[None, :, 2])
    xmax = np.minimum(a[:, None, 3], b[None, :, 3])
    return np.clip(ymax - ymin, 0, None) * np.clip(xmax - xmin, 0, None)
