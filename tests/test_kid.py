"""KID against a direct implementation of its definition, and its behaviour on known
distributions. No network: features are random here (the CLI test in test_fid.py runs it on
Inception features)."""

import itertools

import numpy as np
import pytest

from diffusion_jax.eval import kid


def direct_mmd2(x, y):
    """The unbiased MMD^2 written from its definition, pair by pair:
    mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)."""
    d = len(x[0])
    k = lambda u, v: (sum(float(a) * float(b) for a, b in zip(u, v)) / d + 1) ** 3
    m = len(x)
    off_diagonal = [(i, j) for i, j in itertools.product(range(m), repeat=2) if i != j]
    xx = sum(k(x[i], x[j]) for i, j in off_diagonal) / len(off_diagonal)
    yy = sum(k(y[i], y[j]) for i, j in off_diagonal) / len(off_diagonal)
    xy = sum(k(u, v) for u in x for v in y) / m ** 2
    return xx + yy - 2 * xy


def direct_kid(a, b, subsets, subset_size, seed=2020):
    """torch-fidelity's subset draw (RandomState(seed).choice without replacement, a then b),
    the estimates by `direct_mmd2`, their mean and population std."""
    rng = np.random.RandomState(seed)
    size = min(subset_size, len(a), len(b))
    estimates = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        estimates.append(direct_mmd2(x, y))
    mean = sum(estimates) / len(estimates)
    std = (sum((e - mean) ** 2 for e in estimates) / len(estimates)) ** 0.5
    return mean, std


@pytest.mark.parametrize("n_a, n_b, subset_size", [(12, 12, 1000), (15, 9, 1000), (14, 17, 6)],
                         ids=["equal", "unequal", "subsets"])
def test_kid_equals_the_definition(n_a, n_b, subset_size):
    rng = np.random.default_rng(0)
    a = np.abs(rng.normal(size=(n_a, 7)))  # ReLU-pool-like, as Inception features
    b = np.abs(rng.normal(size=(n_b, 7)) + 0.3)
    mean, std, size = kid.kernel_inception_distance(a, b, subsets=5, subset_size=subset_size)
    assert size == min(subset_size, n_a, n_b)
    expected_mean, expected_std = direct_kid(a, b, 5, subset_size)
    assert abs(mean - expected_mean) <= 1e-10 * max(1.0, abs(expected_mean))
    assert abs(std - expected_std) <= 1e-10 * max(1.0, abs(expected_std))
    if size == min(n_a, n_b) and n_a == n_b:
        assert std <= 1e-10 * abs(mean)  # whole sets, reordered: one estimate, repeated


def test_kid_is_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(1)
    a, b = (np.abs(rng.normal(size=(400, 32))) for _ in range(2))
    same, same_std, _ = kid.kernel_inception_distance(a, b, subsets=20, subset_size=200)
    shifted, shifted_std, _ = kid.kernel_inception_distance(a, b + 0.5, subsets=20,
                                                            subset_size=200)
    assert abs(same) < 3 * same_std + 1e-12  # unbiased: zero within its spread
    assert shifted > 10 * shifted_std > 0
    assert shifted > 100 * abs(same)


def test_kid_matches_torch_fidelity_when_installed():
    fidelity = pytest.importorskip("torch_fidelity.metric_kid")
    import torch

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(60, 16)), rng.normal(size=(50, 16)) + 0.2
    theirs = fidelity.kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b),
                                             kid_subsets=10, kid_subset_size=40, verbose=False)
    mean, std, _ = kid.kernel_inception_distance(a, b, subsets=10, subset_size=40)
    np.testing.assert_allclose([mean, std], [theirs[fidelity.KEY_METRIC_KID_MEAN],
                                             theirs[fidelity.KEY_METRIC_KID_STD]], rtol=1e-10)


def test_kid_bad_features():
    with pytest.raises(ValueError, match="expected \\[N >= 2, D\\]"):
        kid.kernel_inception_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="4 and 3 dimensions"):
        kid.kernel_inception_distance(np.zeros((5, 4)), np.zeros((5, 3)))
