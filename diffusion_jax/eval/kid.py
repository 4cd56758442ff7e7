"""Kernel Inception Distance (Binkowski et al. 2018), as torch-fidelity measures it.

    mean, std = kid.kernel_inception_distance(features_a, features_b)

KID is the squared MMD between two sets of Inception pool features under the polynomial kernel
k(x, y) = (x . y / d + 1)^3, estimated without bias: the within-set kernel sums leave out the
diagonal (k(x, x)), the cross-set sum keeps every pair. Unlike FID it needs the features
themselves, not only their mean and covariance, and it is unbiased at any sample count.

Subsets as torch-fidelity (`metric_kid.py`) draws them: 100 subsets of min(1000, n_a, n_b)
features from each set, drawn without replacement by `np.random.RandomState(2020).choice`, first
from a then from b, subset after subset; the result is the mean and the (population, ddof=0)
standard deviation of the 100 estimates. torch-fidelity refuses sets smaller than the subset
size; clean-fid, like here, shrinks the subset to the smaller set instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SUBSETS = 100
SUBSET_SIZE = 1000
SEED = 2020  # torch-fidelity's default rng_seed
DEGREE = 3
COEF0 = 1.0


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(x y^T / d + 1)^3 for x [n, d] and y [m, d] -> [n, m]."""
    return (x @ y.T / x.shape[1] + COEF0) ** DEGREE


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 estimate between two equally sized sets [m, d] (float64)."""
    m = len(x)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / m ** 2)


def _check_features(features: Any, name: str) -> np.ndarray:
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"KID: {name} has shape {features.shape}; expected [N >= 2, D] features")
    if not np.isfinite(features).all():
        raise ValueError(f"KID: {name} holds NaN or infinite values")
    return features


def kernel_inception_distance(features_a: Any, features_b: Any, *, subsets: int = SUBSETS,
                              subset_size: int = SUBSET_SIZE, seed: int = SEED,
                              ) -> tuple[float, float, int]:
    """(mean, std, subset size) of the unbiased MMD^2 over `subsets` random subsets, in
    float64, subsets drawn as torch-fidelity draws them (module docstring)."""
    a = _check_features(features_a, "the first features")
    b = _check_features(features_b, "the second features")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"KID: features of {a.shape[1]} and {b.shape[1]} dimensions; both sides "
                         "need the same Inception features")
    size = min(subset_size, len(a), len(b))
    rng = np.random.RandomState(seed)
    estimates = np.zeros(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        estimates[i] = mmd2_unbiased(x, y)
    return float(estimates.mean()), float(estimates.std()), size
