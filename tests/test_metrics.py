"""Tests for metrics.py: the probe that replaces the old C=1 evaluator, DINO-style k-NN, and
diagnostics."""
from __future__ import annotations

import math

import pytest
import torch

import metrics

NUM_CLASSES = 10


def narrow_cone(n: int, generator: torch.Generator, dim: int = 64, signal_dims: int = 8):
    """A big shared unit vector plus offsets 1000x smaller: pairwise cosine > 0.99, yet linearly
    separable.

    The class signal sits in a few low-spread dims and the rest is class-free nuisance spread 200x
    larger. That is what breaks a fixed C on L2-normalized features: a strongly regularized logistic
    regression degenerates to a class-mean template, which cannot down-weight the nuisance dims.
    """
    shape_gen = torch.Generator().manual_seed(1234)  # same cone and class means for train and test
    common = torch.randn(dim, generator=shape_gen)
    class_means = torch.zeros(NUM_CLASSES, dim)
    class_means[:, :signal_dims] = torch.randn(NUM_CLASSES, signal_dims, generator=shape_gen)
    spread = torch.full((dim,), 10.0)
    spread[:signal_dims] = 0.05
    labels = torch.arange(n) % NUM_CLASSES
    offsets = class_means[labels] + spread * torch.randn(n, dim, generator=generator)
    return common / common.norm() + 1e-3 * offsets, labels


def clusters(n: int, generator: torch.Generator, dim: int = 32, scale: float = 0.1):
    """Tight, well-separated Gaussian clusters (one per class) around random directions."""
    centers = torch.randn(NUM_CLASSES, dim, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.arange(n) % NUM_CLASSES
    return centers[labels] + scale * torch.randn(n, dim, generator=generator), labels


# --------------------------------------------------------------------------------------------------
# 1. The old evaluator's failure mode, reproduced and fixed
# --------------------------------------------------------------------------------------------------
def test_narrow_cone_defeats_legacy_probe_but_not_linear_probe():
    g = torch.Generator().manual_seed(0)
    train_x, train_y = narrow_cone(2000, g)
    test_x, test_y = narrow_cone(1000, g)
    assert metrics.mean_pairwise_cosine(train_x) > 0.99
    diagnostics = metrics.collapse_diagnostics(train_x)
    assert diagnostics["collapsed_legacy_cos"]  # the old criterion cries collapse ...
    # ... the centered one does not: the offsets carry the classes
    assert not diagnostics["collapsed"]

    old = metrics.legacy_probe(train_x, train_y, test_x, test_y, C=1.0)
    new = metrics.linear_probe(train_x, train_y, test_x, test_y, NUM_CLASSES)
    assert old < 25.0, f"legacy_probe(C=1) should be near chance on a narrow cone, got {old:.1f}%"
    assert new["acc"] > 95.0, f"linear_probe should separate the cone, got {new}"


@pytest.mark.parametrize("C", [0.1, 1.0, 100.0])
def test_fixed_C_probe_on_the_device_matches_sklearn(C):
    """legacy_probe fits sklearn's objective with the repo's L-BFGS heads: same accuracy as the old
    sklearn call."""
    from sklearn.linear_model import LogisticRegression
    g = torch.Generator().manual_seed(12)
    x = torch.randn(3000, 48, generator=g) + 0.5
    y = (
        x @ torch.randn(48, NUM_CLASSES, generator=g)
        + 2.0 * torch.randn(3000, NUM_CLASSES, generator=g)
    ).argmax(1)
    # the old evaluator's input: L2-normalized
    normalized = torch.nn.functional.normalize(x, dim=1).numpy()
    clf = LogisticRegression(C=C, max_iter=1000).fit(normalized[:2000], y[:2000].numpy())
    expected = 100.0 * float((clf.predict(normalized[2000:]) == y[2000:].numpy()).mean())
    got = metrics.legacy_probe(x[:2000], y[:2000], x[2000:], y[2000:], C=C)
    assert 20.0 < expected < 95.0  # neither trivial nor chance, so the comparison means something
    assert got == pytest.approx(expected, abs=1.0)
    # the features' scale is divided out by the L2 normalization, as in the old evaluator
    assert metrics.legacy_probe(
        x[:2000] * 1e3, y[:2000], x[2000:] * 1e3, y[2000:], C=C
    ) == pytest.approx(got, abs=0.2)


def test_linear_probe_is_invariant_to_feature_scale_and_offset():
    g = torch.Generator().manual_seed(1)
    # overlapping clusters, so accuracy is not trivially 100
    train_x, train_y = clusters(600, g, scale=2.0)
    test_x, test_y = clusters(400, g, scale=2.0)
    base = metrics.linear_probe(train_x, train_y, test_x, test_y, NUM_CLASSES)
    squeezed = metrics.linear_probe(
        train_x * 1e-4 + 5.0, train_y, test_x * 1e-4 + 5.0, test_y, NUM_CLASSES
    )
    assert squeezed["chosen"] == base["chosen"]
    assert squeezed["acc"] == pytest.approx(base["acc"], abs=0.5)


# --------------------------------------------------------------------------------------------------
# 2. k-NN
# --------------------------------------------------------------------------------------------------
def _angle(deg: float) -> torch.Tensor:
    return torch.tensor([math.cos(math.radians(deg)), math.sin(math.radians(deg))])


@pytest.mark.parametrize("cos_b, temperature, expected_class", [
    # One class-0 neighbour at cosine 1 vs two class-1 neighbours at cosine cos_b (k=3).
    # Weighted vote: class 0 wins iff exp(1/T) > 2 exp(cos_b/T), i.e. cos_b < 1 - T ln 2 (= 0.9515
    # at T=0.07).
    (0.5, 0.07, 0),     # weighting beats the 2-vs-1 majority
    (0.94, 0.07, 0),    # just below the hand-computed boundary
    (0.96, 0.07, 1),    # just above it
    (0.5, 100.0, 1),    # huge T -> plain majority count
])
def test_knn_weighted_vote_matches_hand_computation(cos_b, temperature, expected_class):
    theta = math.degrees(math.acos(cos_b))
    # norm is ignored
    train_x = torch.stack([_angle(0.0), _angle(theta), _angle(-theta), _angle(180.0)]) * 3.0
    train_y = torch.tensor([0, 1, 1, 2])
    query = _angle(0.0).view(1, 2)
    for label in range(3):
        acc = metrics.knn_accuracy(
            train_x, train_y, query, torch.tensor([label]), 3, k=3, temperature=temperature
        )
        assert acc == (100.0 if label == expected_class else 0.0)


def test_knn_clamps_k_to_train_size():
    train_x = torch.stack([_angle(0.0), _angle(60.0), _angle(-60.0)])
    train_y = torch.tensor([0, 1, 1])
    query = _angle(0.0).view(1, 2)
    assert metrics.knn_accuracy(train_x, train_y, query, torch.tensor([0]), 2, k=50) == 100.0


def test_knn_separated_clusters_is_perfect_for_any_chunking():
    g = torch.Generator().manual_seed(2)
    train_x, train_y = clusters(500, g)
    test_x, test_y = clusters(203, g)
    for chunk in (7, 64, 1024):
        assert (
            metrics.knn_accuracy(train_x, train_y, test_x, test_y, NUM_CLASSES, chunk=chunk)
            == 100.0
        )
    # bf16 features (as autocast produces) are promoted, not rejected
    assert (
        metrics.knn_accuracy(train_x.bfloat16(), train_y, test_x.bfloat16(), test_y, NUM_CLASSES)
        == 100.0
    )


# --------------------------------------------------------------------------------------------------
# 3. Diagnostics
# --------------------------------------------------------------------------------------------------
def test_identical_rows_are_collapsed():
    x = torch.randn(1, 48, generator=torch.Generator().manual_seed(3)).repeat(200, 1) + 10.0
    d = metrics.collapse_diagnostics(x)
    assert d["pairwise_cos"] == pytest.approx(1.0, abs=1e-5)
    assert d["feature_std"] < 1e-6
    assert d["effective_rank"] == pytest.approx(1.0, abs=1e-3)
    assert d["collapsed"] is True and d["collapsed_legacy_cos"] is True


def test_isotropic_gaussian_is_healthy():
    dim = 32
    x = torch.randn(4000, dim, generator=torch.Generator().manual_seed(4))
    d = metrics.collapse_diagnostics(x)
    assert abs(d["pairwise_cos"]) < 0.01
    assert d["feature_std"] == pytest.approx(1 / math.sqrt(dim), rel=0.05)
    assert 0.95 * dim < d["effective_rank"] <= dim
    assert d["collapsed"] is False and d["collapsed_legacy_cos"] is False


@pytest.mark.parametrize("case,collapsed", [
    # one point: the centered spread is rounding noise, whatever its rank
    ("constant_plus_float_noise", True),
    ("one_line", True),  # every image on one line through the mean: effective rank 1
    ("two_dims", False),  # a plane of spread (unequal axes): rank ~2, not collapsed
    # narrow cone around a big common vector: legacy collapsed, centered healthy
    ("offset_cone", False),
])
def test_centered_collapse_criterion(case, collapsed):
    g = torch.Generator().manual_seed(11)
    common = 50.0 * torch.randn(1, 64, generator=g)
    if case == "constant_plus_float_noise":
        x = common + 1e-7 * common.norm() * torch.randn(500, 64, generator=g)
    elif case == "one_line":
        x = common + torch.randn(500, 1, generator=g) * torch.randn(1, 64, generator=g)
    elif case == "two_dims":
        x = common + torch.randn(500, 2, generator=g) @ torch.randn(2, 64, generator=g)
    else:
        x = common + 0.05 * torch.randn(500, 64, generator=g)
    d = metrics.collapse_diagnostics(x)
    assert d["collapsed"] is collapsed, d
    # all four are narrow cones by the uncentered criterion
    assert d["collapsed_legacy_cos"] is True
    if case == "one_line":
        assert d["effective_rank"] == pytest.approx(1.0, abs=1e-3)


def test_effective_rank_counts_low_rank_structure():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3000, 5, generator=g) @ torch.randn(5, 64, generator=g) + 7.0
    assert 3.0 < metrics.effective_rank(x) < 5.0 + 1e-3
    # the wide case (N <= D) takes the SVD path and must agree with the definition
    wide = torch.randn(20, 64, generator=g)
    s = torch.linalg.svdvals((wide - wide.mean(0)).double())
    p = s / s.sum()
    assert metrics.effective_rank(wide) == pytest.approx(
        float(torch.exp(-(p * p.log()).sum())), rel=1e-4
    )


def test_mean_pairwise_cosine_matches_brute_force():
    # mean != 0 -> nontrivial value
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(6)) + 0.7
    z = torch.nn.functional.normalize(x.double(), dim=1)
    sim = z @ z.T
    brute = (sim.sum() - sim.diagonal().sum()) / (50 * 49)
    assert metrics.mean_pairwise_cosine(x) == pytest.approx(float(brute), abs=1e-6)
    assert metrics.mean_pairwise_cosine(x.bfloat16()) == pytest.approx(float(brute), abs=1e-2)


def test_linear_cka_and_mean_cosine():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2000, 16, generator=g)
    orthogonal, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert metrics.linear_cka(x, x @ orthogonal) == pytest.approx(1.0, abs=1e-5)
    # scale and shift invariant
    assert metrics.linear_cka(x, 5.0 * x + 3.0) == pytest.approx(1.0, abs=1e-5)
    assert metrics.linear_cka(x, torch.randn(2000, 24, generator=g)) < 0.05  # dims may differ
    assert metrics.mean_cosine(x, x) == pytest.approx(1.0, abs=1e-6)
    assert metrics.mean_cosine(x, -2.0 * x) == pytest.approx(-1.0, abs=1e-6)
    with pytest.raises(ValueError):
        metrics.linear_cka(x, x[:100])


# --------------------------------------------------------------------------------------------------
# 4. linear_probe contract
# --------------------------------------------------------------------------------------------------
def test_linear_probe_is_deterministic_and_reports_the_grid():
    g = torch.Generator().manual_seed(8)
    train_x, train_y = clusters(500, g, scale=2.0)
    test_x, test_y = clusters(300, g, scale=2.0)
    grid = (1e-4, 1e-2, 1.0)
    first = metrics.linear_probe(train_x, train_y, test_x, test_y, NUM_CLASSES, grid=grid, seed=3)
    second = metrics.linear_probe(train_x, train_y, test_x, test_y, NUM_CLASSES, grid=grid, seed=3)
    assert first == second
    # evaluators wrap feature extraction in inference_mode / no_grad; the probe must still fit,
    # identically
    with torch.inference_mode():
        assert (
            metrics.linear_probe(train_x, train_y, test_x, test_y, NUM_CLASSES, grid=grid, seed=3)
            == first
        )
    with torch.no_grad():
        assert (
            metrics.linear_probe(train_x, train_y, test_x, test_y, NUM_CLASSES, grid=grid, seed=3)
            == first
        )
    assert first["chosen"] in grid and first["param"] == "weight_decay"
    assert set(first["val_acc"]) == {str(v) for v in grid}
    assert 0.0 <= first["acc"] <= 100.0


def test_linear_probe_ties_go_to_the_strongest_regularization():
    g = torch.Generator().manual_seed(9)
    train_x, train_y = clusters(400, g)
    test_x, test_y = clusters(200, g)
    result = metrics.linear_probe(train_x, train_y, test_x, test_y, NUM_CLASSES)
    assert set(result["val_acc"].values()) == {100.0}
    assert result["chosen"] == max(metrics.DEFAULT_WD_GRID)
    assert result["acc"] == 100.0


def test_linear_probe_on_noise_labels_is_chance():
    g = torch.Generator().manual_seed(10)
    train_x, test_x = torch.randn(2000, 32, generator=g), torch.randn(2000, 32, generator=g)
    train_y = torch.randint(0, NUM_CLASSES, (2000,), generator=g)
    test_y = torch.randint(0, NUM_CLASSES, (2000,), generator=g)
    acc = metrics.linear_probe(train_x, train_y, test_x, test_y, NUM_CLASSES)["acc"]
    assert 6.0 < acc < 14.0  # chance is 10 %; binomial std on 2000 samples is 0.67 points


def test_linear_probe_rejects_bad_inputs():
    x, y = torch.randn(100, 8), torch.arange(100) % 4
    with pytest.raises(ValueError, match="labels"):
        metrics.linear_probe(x, y, x, y + 1, 4)
    with pytest.raises(ValueError, match="val_fraction"):
        metrics.linear_probe(x, y, x, y, 4, val_fraction=0.0)
    with pytest.raises(ValueError, match="grid"):
        metrics.linear_probe(x, y, x, y, 4, grid=(-1e-3,))


# --------------------------------------------------------------------------------------------------
# 5. Low-shot subsets and the probes table
# --------------------------------------------------------------------------------------------------
def class_by_class_labels(counts):
    """Labels stored class by class, as an image folder stores them; `counts` rows of each class."""
    return torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])


@pytest.mark.parametrize("fraction", metrics.LOW_SHOT_FRACTIONS)
def test_low_shot_subset_is_class_stratified(fraction):
    counts = [5000, 3000, 1000, 400, 10]
    labels = class_by_class_labels(counts)
    rows = metrics.low_shot_indices(labels, fraction)
    assert torch.equal(rows, rows.unique())  # sorted, no repeats
    picked = torch.bincount(labels[rows], minlength=len(counts)).tolist()
    assert picked == [max(round(fraction * n), metrics.LOW_SHOT_MIN_PER_CLASS) for n in counts]


def test_low_shot_subset_depends_on_labels_fraction_and_seed_only():
    """Every arm (any train.seed, global RNG state or features) is probed on the same images."""
    labels = class_by_class_labels([600, 600, 600])
    torch.manual_seed(1)
    first = metrics.low_shot_indices(labels, 0.1)
    torch.manual_seed(2)
    torch.rand(100)
    assert torch.equal(first, metrics.low_shot_indices(labels, 0.1))
    other_seed = metrics.low_shot_indices(labels, 0.1, seed=metrics.LOW_SHOT_SEED + 1)
    assert not torch.equal(first, other_seed)
    # not the first rows of each class: a seeded draw from all of them
    assert int(first.max()) > 1700 and len(set((first % 600 // 60).tolist())) > 5


def test_one_percent_images_are_among_the_ten_percent_ones():
    labels = torch.randint(0, NUM_CLASSES, (20000,), generator=torch.Generator().manual_seed(3))
    small = set(metrics.low_shot_indices(labels, 0.01).tolist())
    large = set(metrics.low_shot_indices(labels, 0.1).tolist())
    assert small < large


def test_low_shot_probe_fits_on_its_subset_only():
    """The registered 1 % probe is linear_probe on low_shot_indices' rows (30 of 3000)."""
    g = torch.Generator().manual_seed(11)
    train_x, train_y = clusters(3000, g, scale=2.0)
    test_x, test_y = clusters(500, g, scale=2.0)
    probe = metrics.PROBES[metrics.low_shot_key(0.01)]
    rows = metrics.low_shot_indices(train_y, 0.01)
    got = probe.fit_score(metrics.ProbeData(train_x, train_y, test_x, test_y, NUM_CLASSES))
    expected = metrics.linear_probe(train_x[rows], train_y[rows], test_x, test_y, NUM_CLASSES)
    assert got["acc"] == expected["acc"]
    assert got["linear_acc_1pct_reg"]["num_train"] == len(rows) == 30
    assert got["linear_acc_1pct_reg"]["chosen"] == expected["chosen"]


def test_fewer_labelled_images_probe_worse_in_simulation():
    """Noisy clusters, 4 draws: on average the 1 % probe is clearly below the 10 % one, which is
    below the full probe (seen per draw: ~24 < ~41 < ~49 %)."""
    means = {key: [] for key in ("linear_acc_1pct", "linear_acc_10pct", "linear_acc")}
    for draw in range(4):
        g = torch.Generator().manual_seed(100 + draw)
        train_x, train_y = clusters(1000, g, dim=8, scale=6.0)
        test_x, test_y = clusters(500, g, dim=8, scale=6.0)
        data = metrics.ProbeData(train_x, train_y, test_x, test_y, NUM_CLASSES)
        for key in means:
            means[key].append(metrics.PROBES[key].fit_score(data)["acc"])
    one, ten, full = (sum(v) / len(v) for v in means.values())
    assert one + 5.0 < ten and ten + 2.0 < full, (one, ten, full)


def test_probes_table_lists_the_protocols_in_column_order():
    assert list(metrics.PROBES) == ["linear_acc", "linear_acc_cls_patch", "linear_acc_fixed_C",
                                    "knn_acc", "linear_acc_1pct", "linear_acc_10pct"]
    assert metrics.PROBES["linear_acc_fixed_C"].row_key == "fixed_C_acc"
    with pytest.raises(ValueError, match="feature must be one of"):
        metrics.register_probe(metrics.Probe("x_acc", "x %", "patches", lambda d: {}, "x"))
    assert "x_acc" not in metrics.PROBES
