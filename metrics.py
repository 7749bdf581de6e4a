"""Feature-level metrics: linear probe, k-NN, collapse / similarity diagnostics, and PROBES, the
table of the evaluation protocols every result file and report iterates.

Pure functions on feature tensors [N, D] (CPU or CUDA; bf16/fp16 inputs are promoted to float32).
Used by evaluate_checkpoints.py (the PROBES + diagnostics per checkpoint) and by distill_trainer.py
(cheap per-epoch diagnostics). A new probe is one register_probe(Probe(...)) call
(docs/evaluation.md).

Why a new probe: the old evaluator fitted sklearn LogisticRegression(C=1.0) on L2-normalized
features. A fixed C is a scale-dependent regularizer: when the class signal is tiny next to a big
common vector and to nuisance spread (a narrow cone), the strongly regularized optimum degenerates
to a class-mean template that cannot down-weight nuisance directions, and accuracy drops to chance
although the classes are linearly separable. `linear_probe` standardizes the features and picks the
regularization on a held-out split, the way DINO's eval_linear sweeps learning rates; `legacy_probe`
keeps the old recipe only for comparison.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# L2 penalty on the head weights (bias is not penalized), objective = mean CE + wd/2 * ||W||^2 on
# standardized features. Equivalent sklearn C = 1 / (wd * n_train): for 50k samples, wd=1e-4 ~
# C=0.2.
DEFAULT_WD_GRID: Tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
LBFGS_MAX_ITER = 100  # full-batch iterations per fit; preconditioned heads settle in ~30-50
# the fixed-C probe's wd = 1 / (C n) is weak: its optimum lies further from the zero init
LEGACY_MAX_ITER = 200
COLLAPSE_COS = 0.7  # the legacy evaluator's criterion: mean pairwise cosine above this = collapsed
# collapsed: the spread around the mean is ~one line: effective rank below this
COLLAPSE_MIN_RANK = 1.5
# ... or is below this fraction of the features' norm (float noise around one point)
COLLAPSE_MIN_SPREAD = 1e-4


def _features(x: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(x.shape)}")
    return x.to(device=device if device is not None else x.device, dtype=torch.float32)


def _labels(y: torch.Tensor, n: int, num_classes: int, device: torch.device) -> torch.Tensor:
    y = torch.as_tensor(y).to(device=device, dtype=torch.long).view(-1)
    if y.numel() != n:
        raise ValueError(f"got {y.numel()} labels for {n} feature rows")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]"
        )
    return y


def _centered(x: torch.Tensor) -> torch.Tensor:
    # The mean in float64: a narrow cone is a big common vector plus tiny offsets, and those offsets
    # are exactly what the centered features must keep.
    return x - x.mean(0, keepdim=True, dtype=torch.float64).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------------
def _standardize(train_x: torch.Tensor, *others: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Scale every dim to zero mean / unit std using TRAIN statistics only; constant dims become 0.

    No additive epsilon: any fixed epsilon is scale-dependent and would squash the tiny-spread
    features this probe exists to measure. A dim counts as constant when its std is at float32
    rounding level of its mean.
    """
    mean = train_x.mean(0, keepdim=True, dtype=torch.float64)
    centered = train_x - mean.to(train_x.dtype)
    std = centered.pow(2).mean(0, keepdim=True, dtype=torch.float64).sqrt()
    constant = (std <= 1e-6 * mean.abs()) | (std < 1e-30)  # the second term only keeps 1/std finite
    scale = torch.where(constant, torch.zeros_like(std), 1.0 / std.clamp_min(1e-300)).to(
        train_x.dtype
    )
    mean = mean.to(train_x.dtype)
    return (centered * scale,) + tuple((x - mean) * scale for x in others)


def _stratified_split(
    labels: torch.Tensor, val_fraction: float, seed: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seeded per-class split of row indices into (fit, val); every class with >= 2 rows lands in
    both."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = labels.cpu()
    generator = torch.Generator().manual_seed(seed)
    fit_parts, val_parts = [], []
    for c in torch.unique(labels).tolist():
        rows = (labels == c).nonzero().view(-1)
        rows = rows[torch.randperm(len(rows), generator=generator)]
        n_val = min(max(int(round(val_fraction * len(rows))), 1), len(rows) - 1)
        val_parts.append(rows[:n_val])
        fit_parts.append(rows[n_val:])
    val_idx = torch.cat(val_parts).sort().values
    if val_idx.numel() == 0:
        raise ValueError("validation split is empty: every class has a single training row")
    return torch.cat(fit_parts).sort().values, val_idx


def _preconditioner(x: torch.Tensor, weight_decays: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-head P_g ~ (H_g)^(-1/2), with H_g = cov(x) / C + wd_g I the curvature of the objective at
    init.

    Real features are far from isotropic (condition numbers ~1e4 after per-dim standardization);
    optimizing W_g = P_g V_g instead of W_g makes every head well conditioned, so L-BFGS converges
    in tens of iterations instead of thousands. The objective and its minimizer are unchanged.
    """
    cov = (x.T @ x).double() / len(x)
    evals, evecs = torch.linalg.eigh(cov)
    # [G, D]
    denom = evals.clamp_min(0).unsqueeze(0) / num_classes + weight_decays.double().view(-1, 1)
    denom = denom.clamp_min(1e-6 * float(denom.max()))  # dims with no variance and wd = 0
    return ((evecs.unsqueeze(0) * denom.rsqrt().unsqueeze(1)) @ evecs.T).to(x.dtype)  # [G, D, D]


def _fit_heads(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decays: Sequence[float],
               max_iter: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, one head per weight decay, all fitted in one full-batch
    L-BFGS run.

    The objective is the sum of the heads' independent (convex) objectives, so its minimizer is each
    head's own minimizer, while one [N, D] x [D, G*C] matmul serves all heads. Zero init + full
    batch: deterministic. Returns weight [G, D, C] and bias [G, C].
    """
    n, dim = x.shape
    heads = len(weight_decays)
    wd = torch.tensor(list(weight_decays), dtype=x.dtype, device=x.device)
    precond = _preconditioner(x, wd, num_classes)
    v = torch.zeros(heads, dim, num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(heads * num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    target = y.view(n, 1).expand(n, heads)
    optimizer = torch.optim.LBFGS(
        [v, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        weight = torch.bmm(precond, v)
        logits = torch.addmm(bias, x, weight.permute(1, 0, 2).reshape(dim, -1)).view(
            n, heads, num_classes
        )
        # cross_entropy averages over N and heads; times `heads` = sum of the per-head mean losses.
        loss = F.cross_entropy(logits.transpose(1, 2), target) * heads
        loss = loss + 0.5 * (wd.view(heads, 1, 1) * weight.pow(2)).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return torch.bmm(precond, v), bias.detach().view(heads, num_classes)


def _predict_per_head(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return (torch.einsum("nd,gdc->gnc", x, weight) + bias.unsqueeze(1)).argmax(-1)  # [G, N]


def _correct_per_head(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    return (_predict_per_head(x, weight, bias) == y.unsqueeze(0)).sum(1)


def _int16(predictions: torch.Tensor) -> torch.Tensor:
    """Per-image predicted classes as the result files store them (the report's paired contrasts
    read them)."""
    return predictions.to(device="cpu", dtype=torch.int16)


def _select_weight_decay(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    grid: Sequence[float],
    val_fraction: float,
    seed: int,
    max_iter: int,
) -> Tuple[float, Dict[str, float]]:
    """Fit every grid value on the train-minus-val rows; return the best by val accuracy and all val
    accuracies."""
    fit_idx, val_idx = (i.to(x.device) for i in _stratified_split(y, val_fraction, seed))
    grid = sorted((float(v) for v in grid), reverse=True)  # strongest first, so ties keep it
    weight, bias = _fit_heads(x[fit_idx], y[fit_idx], num_classes, grid, max_iter)
    val_correct = _correct_per_head(x[val_idx], y[val_idx], weight, bias).tolist()
    best = max(range(len(grid)), key=lambda g: (val_correct[g], -g))
    return grid[best], {str(v): 100.0 * c / len(val_idx) for v, c in zip(grid, val_correct)}


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    *,
    val_fraction: float = 0.1,
    grid: Sequence[float] = DEFAULT_WD_GRID,
    seed: int = 0,
    device: Optional[torch.device] = None,
    max_iter: int = LBFGS_MAX_ITER,
    return_predictions: bool = False,
) -> dict:
    """Standardized-feature logistic-regression probe with the weight decay chosen on a held-out
    split.

    Returns {'acc': test top-1 %, 'chosen': wd, 'param': 'weight_decay', 'val_acc': {str(float(wd)):
    val top-1 %}}, with return_predictions also 'predictions': an int16 CPU tensor of the predicted
    test classes. The test split is touched once, after the choice. Ties in val accuracy go to the
    stronger weight decay. Deterministic for a given seed (the seed only drives the val split; the
    fit itself has no randomness).
    """
    if len(grid) == 0 or min(float(v) for v in grid) < 0:
        raise ValueError(
            f"linear_probe needs a non-empty grid of weight decays >= 0, got {list(grid)}"
        )
    device = torch.device(device) if device is not None else train_x.device
    # Evaluators usually run under no_grad()/inference_mode(); the fit needs autograd, and tensors
    # made here must be ordinary (not inference) tensors so backward can save them.
    with torch.inference_mode(False), torch.enable_grad():
        train_x, test_x = _features(train_x, device), _features(test_x, device)
        if train_x.shape[1] != test_x.shape[1]:
            raise ValueError(f"train dim {train_x.shape[1]} != test dim {test_x.shape[1]}")
        train_y = _labels(train_y, len(train_x), num_classes, device).clone()
        test_y = _labels(test_y, len(test_x), num_classes, device)
        train_x, test_x = _standardize(train_x, test_x)

        chosen, val_acc = _select_weight_decay(
            train_x, train_y, num_classes, grid, val_fraction, seed, max_iter
        )
        weight, bias = _fit_heads(train_x, train_y, num_classes, [chosen], max_iter)
        predictions = _predict_per_head(test_x, weight, bias)[0]
        test_correct = int((predictions == test_y).sum())
    out = {
        "acc": 100.0 * test_correct / max(len(test_y), 1),
        "chosen": chosen,
        "param": "weight_decay",
        "val_acc": val_acc,
    }
    return {**out, "predictions": _int16(predictions)} if return_predictions else out


def legacy_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    C: float,
    num_classes: Optional[int] = None,
    device: Optional[torch.device] = None,
    max_iter: int = LEGACY_MAX_ITER,
    return_predictions: bool = False,
):
    """The legacy evaluator's probe, kept for comparison: LogisticRegression(C) on L2-normalized
    features, test top-1 %.

    Same objective as sklearn's lbfgs multinomial fit, C * sum(CE) + ||W||^2 / 2 with the intercept
    unpenalized, divided by C n: mean CE + wd/2 ||W||^2 with wd = 1 / (C n). Fitted by `_fit_heads`
    on `device` (sklearn on the CPU takes tens of seconds per entry on 50k features). Its fixed C
    makes the result depend on feature scale; see the module docstring. With return_predictions:
    (top-1 %, int16 CPU tensor of the predicted test classes).
    """
    if not C > 0:
        raise ValueError(f"legacy_probe needs C > 0, got {C}")
    device = torch.device(device) if device is not None else train_x.device
    with torch.inference_mode(False), torch.enable_grad():
        train_x = F.normalize(_features(train_x, device), dim=1)
        test_x = F.normalize(_features(test_x, device), dim=1)
        if num_classes is None:
            num_classes = (
                int(max(int(torch.as_tensor(train_y).max()), int(torch.as_tensor(test_y).max())))
                + 1
            )
        train_y = _labels(train_y, len(train_x), num_classes, device).clone()
        test_y = _labels(test_y, len(test_x), num_classes, device)
        weight, bias = _fit_heads(
            train_x, train_y, num_classes, [1.0 / (C * len(train_x))], max_iter
        )
        predictions = _predict_per_head(test_x, weight, bias)[0]
    acc = 100.0 * int((predictions == test_y).sum()) / max(len(test_y), 1)
    return (acc, _int16(predictions)) if return_predictions else acc


# --------------------------------------------------------------------------------------------------
# k-NN (DINO eval_knn)
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def knn_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
    return_predictions: bool = False,
):
    """Weighted k-NN top-1 % as in DINO: cosine similarity, top-k neighbours, vote weight exp(sim /
    T); with return_predictions: (top-1 %, int16 CPU tensor of the predicted test classes)."""
    if len(train_x) == 0 or k < 1 or temperature <= 0:
        raise ValueError(
            f"knn_accuracy needs train rows, k >= 1 and temperature > 0 (k={k}, T={temperature})"
        )
    train = F.normalize(_features(train_x), dim=1)
    device = train.device
    train_y = _labels(train_y, len(train), num_classes, device)
    test_x = _features(test_x, device)
    test_y = _labels(test_y, len(test_x), num_classes, device)
    k = min(k, len(train))
    predictions = []
    for start in range(0, len(test_x), chunk):
        query = F.normalize(test_x[start:start + chunk], dim=1)
        sim, idx = (query @ train.T).topk(k, dim=1)
        # Subtracting the row max leaves the vote ranking unchanged and keeps exp() finite for small
        # T.
        weights = ((sim - sim[:, :1]) / temperature).exp()
        votes = torch.zeros(len(query), num_classes, device=device).scatter_add_(
            1, train_y[idx], weights
        )
        predictions.append(votes.argmax(1))
    predicted = torch.cat(predictions) if predictions else test_y.new_zeros(0)
    acc = 100.0 * int((predicted == test_y).sum()) / max(len(test_x), 1)
    return (acc, _int16(predicted)) if return_predictions else acc


# --------------------------------------------------------------------------------------------------
# Collapse and similarity diagnostics
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine over all ordered pairs i != j, in O(N D) memory: sum_{i!=j} z_i.z_j = |sum z|^2 -
    sum |z_i|^2."""
    z = F.normalize(_features(x), dim=1)
    n = len(z)
    if n < 2:
        raise ValueError("mean_pairwise_cosine needs at least 2 rows")
    total = z.sum(0, dtype=torch.float64)
    self_sim = z.pow(2).sum(dtype=torch.float64)
    return float((total @ total - self_sim) / (n * (n - 1)))


@torch.no_grad()
def feature_std(x: torch.Tensor) -> float:
    """Mean over dims of the per-dim std of L2-normalized features: 0 when collapsed, ~1/sqrt(D)
    when isotropic."""
    z = F.normalize(_features(x), dim=1)
    if len(z) < 2:
        raise ValueError("feature_std needs at least 2 rows")
    return float(z.std(0).mean())


def _singular_values(x: torch.Tensor) -> torch.Tensor:
    """Singular values in float64. Tall matrices go through the D x D Gram in float64: an SVD of 50k
    x 768 takes >10 s on 2 CPU cores, the Gram ~1-2 s, and float64 keeps sqrt(eigenvalue) exact
    enough for near-zero modes (a float32 Gram would give every null direction a spurious ~3e-4 *
    s_max and inflate the rank)."""
    if len(x) <= x.shape[1]:
        return torch.linalg.svdvals(x).double()
    gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, len(x), 8192):  # chunks bound the float64 copy
        rows = x[start:start + 8192].double()
        gram += rows.T @ rows
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)


@torch.no_grad()
def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy of normalized singular values) of the centered features (Roy & Vetterli 2007), in
    [1, min(N, D)].

    Features with no spread at all (every row identical) return 1.0, the collapsed end of the scale.
    """
    s = _singular_values(_centered(_features(x)))
    if float(s.sum()) <= 0.0:
        return 1.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _check_paired(x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    x = _features(x)
    y = _features(y, x.device)
    if len(x) != len(y):
        raise ValueError(f"paired features need the same rows, got {len(x)} and {len(y)}")
    return x, y


@torch.no_grad()
def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two feature sets over the same rows; dims may differ.

    Computed in feature space (D x D Gram matrices), so memory is O((N + D) D). Returns 0.0 when
    either set has no variance (CKA is undefined there; 0 keeps logs valid JSON).
    """
    x, y = _check_paired(x, y)
    x, y = _centered(x), _centered(y)
    cross = (x.T @ y).double().pow(2).sum()
    norm = torch.linalg.matrix_norm((x.T @ x).double()) * torch.linalg.matrix_norm(
        (y.T @ y).double()
    )
    if float(norm) == 0.0:
        return 0.0
    return float(cross / norm)


@torch.no_grad()
def mean_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over rows of cos(x_i, y_i), e.g. student vs teacher features of the same images."""
    x, y = _check_paired(x, y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"mean_cosine needs equal dims, got {x.shape[1]} and {y.shape[1]}")
    return float(F.cosine_similarity(x, y, dim=1).mean())


@torch.no_grad()
def is_collapsed(x: torch.Tensor, rank: Optional[float] = None) -> bool:
    """Collapse judged on the spread around the mean: effective rank of the centered features <
    COLLAPSE_MIN_RANK, or a spread below COLLAPSE_MIN_SPREAD of the feature norm (a constant output
    plus float noise).

    Why centered: the legacy criterion (uncentered mean pairwise cosine > 0.7) measures the common
    vector, not the information; a narrow cone (big shared vector, small class-dependent offsets)
    scores ~1 there although a standardized probe separates it. A centered pairwise cosine is no
    remedy: the centered rows sum to zero, so their mean pairwise cosine is about -1/(N-1) for any
    features. Why an absolute rank and not a fraction of the dimension: collapse means the images
    land on (about) one point or one line (rank 1; a plane is 2, hence the threshold half way); a
    healthy supervised network concentrates its features in C - 1 = 9 of 384 directions (neural
    collapse, 2 %), which a probe reads perfectly and a relative threshold would call collapsed.
    `rank` is effective_rank(x) when already computed.
    """
    x = _features(x)
    spread = _centered(x).norm(dim=1).mean()
    if float(spread) <= COLLAPSE_MIN_SPREAD * float(x.norm(dim=1).mean()):
        return True
    return (effective_rank(x) if rank is None else rank) < COLLAPSE_MIN_RANK


def collapse_diagnostics(x: torch.Tensor) -> Dict[str, object]:
    """Pairwise cosine, feature std, effective rank; 'collapsed' from the centered measure
    (is_collapsed) and 'collapsed_legacy_cos' from the legacy evaluator's uncentered criterion (mean
    pairwise cosine > 0.7)."""
    pairwise_cos = mean_pairwise_cosine(x)
    rank = effective_rank(x)
    f = _features(x)
    # The second figure is_collapsed reads: shown beside the verdict when it, not the rank, decides.
    spread = float(_centered(f).norm(dim=1).mean()) / max(float(f.norm(dim=1).mean()), 1e-30)
    return {
        "pairwise_cos": pairwise_cos,
        "feature_std": feature_std(x),
        "effective_rank": rank,
        "relative_spread": spread,
        "collapsed": is_collapsed(x, rank),
        "collapsed_legacy_cos": pairwise_cos > COLLAPSE_COS,
    }


# --------------------------------------------------------------------------------------------------
# The probes: one table, read by the evaluator (JSON keys, markdown columns, summary lines) and the
# experiment runner (rows, intervals, tables)
# --------------------------------------------------------------------------------------------------
KNN_K, KNN_TEMPERATURE = 20, 0.07  # DINO eval_knn defaults
VAL_FRACTION = 0.1  # share of train held out to choose the linear probe's weight decay
LOW_SHOT_FRACTIONS = (0.01, 0.1)  # share of the labelled training images low-shot probes fit on
# A constant, not train.seed: every arm and every seed is probed on the same low-shot images.
LOW_SHOT_SEED = 0
LOW_SHOT_MIN_PER_CLASS = 2  # the validation split needs one image of each class on both sides
# What a probe reads: the probe feature (CLS, or the mean patch token); CLS + mean patch token.
FEATURES = ("pooled", "cls_patch")


@dataclass(frozen=True)
class ProbeData:
    """What a probe sees: one feature kind of train and test images, labels, the run's settings."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    device: Optional[torch.device] = None
    fixed_C: Optional[float] = None  # --linear_probe_C; the legacy probe runs only with it


@dataclass(frozen=True)
class Probe:
    """One evaluation protocol. fit_score returns {"acc": test top-1 % (None: not run),
    "predictions": predicted test classes (optional: the report's paired contrasts read them),
    other keys...}: "acc" is stored under `key` in the evaluator's entries, the predictions beside
    them (eval_predictions.npz), the other keys go into the entry as they are."""
    key: str  # JSON key of the entry (eval_results.json) and of the runner's rows unless row_key
    title: str  # column title in every markdown table; summary lines drop a trailing " %"
    feature: str  # one of FEATURES
    fit_score: Callable[[ProbeData], Dict[str, Any]]
    note: str  # its sentence in the tables' note
    # An extra column after the accuracy: (title, entry -> value, format spec).
    detail: Optional[Tuple[str, Callable[[Dict[str, Any]], Any], str]] = None
    row_key: Optional[str] = None  # the runner's row/summary name where it predates this table


PROBES: Dict[str, Probe] = {}


def register_probe(probe: Probe) -> Probe:
    """Adds `probe` to PROBES, after the others (columns keep their order); same key: replaced."""
    if probe.feature not in FEATURES:
        raise ValueError(f"probe {probe.key}: feature must be one of {FEATURES}, "
                         f"got {probe.feature!r}")
    PROBES[probe.key] = probe
    return probe


def low_shot_indices(labels: torch.Tensor, fraction: float,
                     seed: int = LOW_SHOT_SEED) -> torch.Tensor:
    """Sorted row indices of a class-stratified seeded `fraction` of the labelled rows: per class
    round(fraction * n_c) rows, at least LOW_SHOT_MIN_PER_CLASS (all of a smaller class).

    A function of (labels, fraction, seed) only, so every arm gets the same images; one seeded
    order per class serves every fraction, so the 1 % images are among the 10 % ones.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"low-shot fraction must be in (0, 1], got {fraction}")
    labels = torch.as_tensor(labels).cpu().view(-1)
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for c in torch.unique(labels).tolist():
        rows = (labels == c).nonzero().view(-1)
        rows = rows[torch.randperm(len(rows), generator=generator)]
        parts.append(rows[:max(int(round(fraction * len(rows))), LOW_SHOT_MIN_PER_CLASS)])
    return torch.cat(parts).sort().values


def _linear(d: ProbeData) -> Dict[str, Any]:
    r = linear_probe(d.train_x, d.train_y, d.test_x, d.test_y, d.num_classes,
                     val_fraction=VAL_FRACTION, device=d.device, return_predictions=True)
    return {"acc": r["acc"], "predictions": r["predictions"],
            "linear_reg": {"param": r["param"], "chosen": r["chosen"], "val_acc": r["val_acc"]}}


def _fixed_C(d: ProbeData) -> Dict[str, Any]:
    if d.fixed_C is None:
        return {"acc": None, "linear_probe_C": None}
    acc, predictions = legacy_probe(d.train_x, d.train_y, d.test_x, d.test_y, C=d.fixed_C,
                                    num_classes=d.num_classes, device=d.device,
                                    return_predictions=True)
    return {"acc": acc, "predictions": predictions, "linear_probe_C": d.fixed_C}


def _knn(d: ProbeData) -> Dict[str, Any]:
    acc, predictions = knn_accuracy(d.train_x, d.train_y, d.test_x, d.test_y, d.num_classes,
                                    k=KNN_K, temperature=KNN_TEMPERATURE, return_predictions=True)
    return {"acc": acc, "predictions": predictions}


def low_shot_key(fraction: float) -> str:
    return f"linear_acc_{fraction * 100:g}pct"


def _low_shot(fraction: float) -> Callable[[ProbeData], Dict[str, Any]]:
    def fit_score(d: ProbeData) -> Dict[str, Any]:
        train_y = torch.as_tensor(d.train_y)
        rows = low_shot_indices(train_y, fraction).to(train_y.device)
        r = linear_probe(d.train_x[rows.to(d.train_x.device)], train_y[rows], d.test_x, d.test_y,
                         d.num_classes, val_fraction=VAL_FRACTION, device=d.device,
                         return_predictions=True)
        details = {"chosen": r["chosen"], "num_train": len(rows), "fraction": fraction,
                   "seed": LOW_SHOT_SEED}
        return {"acc": r["acc"], "predictions": r["predictions"],
                f"{low_shot_key(fraction)}_reg": details}
    return fit_score


register_probe(Probe(
    "linear_acc", "linear %", "pooled", _linear,
    f"Linear probe: standardized features, weight decay (wd) chosen on a stratified "
    f"{VAL_FRACTION:.0%} validation split of train, refitted on all of train.",
    detail=("wd", lambda e: e["linear_reg"]["chosen"], "g")))
register_probe(Probe("linear_acc_cls_patch", "CLS+patch %", "cls_patch", _linear,
                     "CLS+patch: the same probe on CLS concatenated with the mean patch token."))
register_probe(Probe("linear_acc_fixed_C", "fixed-C probe %", "pooled", _fixed_C,
                     "Fixed-C probe: the legacy LogisticRegression(C) on L2-normalized features.",
                     detail=("C", lambda e: e["linear_probe_C"], "g"), row_key="fixed_C_acc"))
register_probe(Probe("knn_acc", "kNN %", "pooled", _knn,
                     f"kNN: k={KNN_K}, T={KNN_TEMPERATURE}, cosine."))
for _fraction in LOW_SHOT_FRACTIONS:
    register_probe(Probe(
        low_shot_key(_fraction), f"{_fraction:.0%} train linear %", "pooled", _low_shot(_fraction),
        f"{_fraction:.0%} train linear: the linear probe fitted on a class-stratified "
        f"{_fraction:.0%} of the training images (seed {LOW_SHOT_SEED}, the same images for every "
        f"arm)."))
