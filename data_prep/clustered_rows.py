"""Synthetic classifier rows with the structure of trained ones: classes in families of similar
products (a family centre plus per-class noise), unit norm. Used by the KNN graph benchmark and
tests, where a graph's recall must be measured on rows whose neighbours mean something.

Every random draw is keyed by (seed, purpose, block) (`common.keyed_random`), so rows
[start, stop) are the same whatever the partition of the classes over ranks.
"""
from __future__ import annotations

import math

import numpy as np

from common.keyed_random import BLOCK_ROWS, fill_keyed_rows


def clustered_weights(num_classes: int, dim: int, start: int, stop: int, family: int = 16,
                      spread: float = 0.75, seed: int = 0) -> np.ndarray:
    """Rows [start, stop) (float32, unit norm): class c belongs to family perm(c) // `family`;
    its row is its family's random unit centre plus `spread` * N(0, I/D), renormalised."""
    family_of = np.random.default_rng([seed, 1]).permutation(num_classes)[start:stop] // family
    num_families = math.ceil(num_classes / family)
    centres_fD = np.empty((num_families, dim), dtype=np.float64)
    fill_keyed_rows(centres_fD, [seed, 2], 0, lambda rng, lo: rng.standard_normal(
        (min(BLOCK_ROWS, num_families - lo), dim)))
    centres_fD /= np.linalg.norm(centres_fD, axis=1, keepdims=True)
    return _add_noise(centres_fD[family_of], start, spread, [seed, 3])


def drifted(rows_cD: np.ndarray, start: int, drift: float, seed: int) -> np.ndarray:
    """The rows after training moved them a little: + drift * N(0, I/D), renormalised (the same
    rows whatever the partition)."""
    return _add_noise(rows_cD.astype(np.float64), start, drift, [seed, 4])


def _add_noise(rows_cD: np.ndarray, start: int, scale: float, key: list) -> np.ndarray:
    """float32 unit rows of rows_cD (float64, rows [start, start + n), changed in place) +
    scale * N(0, I/D), the noise keyed by block."""
    dim = rows_cD.shape[1]
    noise_cD = fill_keyed_rows(np.empty_like(rows_cD), key, start,
                               lambda rng, lo: rng.standard_normal((BLOCK_ROWS, dim)))
    rows_cD += scale / math.sqrt(dim) * noise_cD
    rows_cD /= np.linalg.norm(rows_cD, axis=1, keepdims=True)
    return rows_cD.astype(np.float32)
