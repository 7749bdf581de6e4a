"""Feature-distillation loss: student tokens -> adapters -> per-token distance to teacher tokens.

CLS: batch mean of d(P_cls s_cls, t_cls), d a distance of train.distill_loss (cosine: 1 - cos,
mse, smooth_l1, or a weighted mix of them).
Patch: the teacher's token grid (16x16 for ViT-B/14 at 224 px) is area-pooled onto the student's
grid (6x6 for ViT-S/16 at 96 px), so each student token is paired with the teacher tokens covering
the same pixels, then the mean over tokens and batch of d(P_patch s_patch, pooled t_patch).
Total = w_cls * CLS + w_patch * patch (+ train.ce_weight * cross-entropy of a linear head).

Every criterion names its terms (`term_names`); its forward returns (total, *terms) in that order,
and the step's loss buffer, the epoch sums, the log keys (loss_<name>), the report and the plots
read the names from there. A new distance is one function under `@register_distance("name")`;
train.distill_loss then accepts the name.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

import config

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DISTANCES: Dict[str, Distance] = {}
TOKENS = ("cls", "patch")


def register_distance(name: str) -> Callable[[Distance], Distance]:
    """Makes `fn(prediction, target) -> scalar` a choice of train.distill_loss."""
    def add(fn: Distance) -> Distance:
        DISTANCES[name] = fn
        config.DISTILL_LOSSES.add(name)
        return fn
    return add


def area_pool_matrix(src: int, dst: int) -> torch.Tensor:
    """[dst, src] weights: row i holds the overlap of source cell j with destination cell i (rows
    sum to 1).

    Both grids span the same image, so destination cell i covers source coordinates
    [i*src/dst, (i+1)*src/dst]; with 16 -> 6 a teacher token on a cell border is shared by two
    student tokens in proportion to its overlap.
    """
    edges_dst = torch.arange(dst + 1, dtype=torch.float64) * src / dst
    lo = torch.maximum(edges_dst[:-1, None], torch.arange(src, dtype=torch.float64)[None, :])
    hi = torch.minimum(edges_dst[1:, None], torch.arange(1, src + 1, dtype=torch.float64)[None, :])
    overlap = (hi - lo).clamp(min=0)
    return (overlap / overlap.sum(dim=1, keepdim=True)).float()


def pool_tokens(tokens: torch.Tensor, src_hw: Tuple[int, int], pool_h: torch.Tensor,
                pool_w: torch.Tensor) -> torch.Tensor:
    """[B, Hs*Ws, D] tokens on the source grid -> [B, Hd*Wd, D] on the destination grid
    (separable area pooling)."""
    b, _, d = tokens.shape
    grid = tokens.reshape(b, src_hw[0], src_hw[1], d)
    pooled = torch.einsum("ih,bhwd,jw->bijd", pool_h.to(tokens.dtype), grid,
                          pool_w.to(tokens.dtype))
    return pooled.reshape(b, -1, d)


def semi_orthogonal(out_dim: int, in_dim: int, seed: int) -> torch.Tensor:
    """A fixed random [out, in] matrix with orthonormal columns (or rows), reproducible from `seed`
    on any device."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(max(out_dim, in_dim), min(out_dim, in_dim), generator=generator,
                           dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # The sign fix makes Q unique, so the map does not depend on the QR backend.
    q = q * torch.sign(torch.diagonal(r))
    return (q if out_dim >= in_dim else q.T).float()


@register_distance("cosine")
def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos over all leading dims, computed in fp32."""
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()


@register_distance("mse")
def mse_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per element, fp32; scale-sensitive, unlike the cosine (raw DINOv2 tokens
    have large norms: model.target_norm puts them on a common scale)."""
    return F.mse_loss(a.float(), b.float())


@register_distance("smooth_l1")
def smooth_l1_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Huber (beta 1) per element, fp32: quadratic near the target, linear for outliers (Theia,
    AM-RADIO)."""
    return F.smooth_l1_loss(a.float(), b.float(), beta=1.0)


def distance_mix(spec: Union[str, Dict[str, float]]) -> Dict[str, float]:
    """train.distill_loss as {distance: weight}: 'cosine' -> {'cosine': 1.0}."""
    return {spec: 1.0} if isinstance(spec, str) else {name: float(w) for name, w in spec.items()}


def distill_term_names(mix: Dict[str, float]) -> Tuple[str, ...]:
    """(cls, patch) for one distance; (cls_<d>, ..., patch_<d>, ...) for a mix."""
    return TOKENS if len(mix) == 1 else tuple(f"{t}_{d}" for t in TOKENS for d in mix)


def term_names(train_cfg: config.TrainConfig) -> Tuple[str, ...]:
    """The criterion's term names for a train config: log.jsonl's loss_<name> keys besides loss."""
    if train_cfg.objective == "supervised":
        return LabelLoss.term_names
    labels = LabelLoss.term_names if train_cfg.ce_weight > 0 else ()
    return distill_term_names(distance_mix(train_cfg.distill_loss)) + labels


def uses_labels(train_cfg: config.TrainConfig) -> bool:
    """Whether a run trains on the labels (supervised, or distillation plus cross-entropy): reports
    mark such arms, since the method is otherwise label-free."""
    return train_cfg.objective == "supervised" or train_cfg.ce_weight > 0


def describe(train_cfg: config.TrainConfig) -> str:
    """What the training loss is, for the loss panel's title."""
    if train_cfg.objective == "supervised":
        return "cross-entropy of the linear head on the labels"
    mix = distance_mix(train_cfg.distill_loss)
    names = {"cosine": "(1−cos)", "mse": "MSE", "smooth_l1": "smooth-L1"}
    if len(mix) == 1:
        d = names.get(next(iter(mix)), next(iter(mix)))
    else:
        d = "(" + " + ".join(f"{w:g}·{names.get(n, n)}" for n, w in mix.items()) + ")"
    w, ce = train_cfg.distill_loss_weights, train_cfg.ce_weight
    text = f"{w['cls']:g}·{d} CLS + {w['patch']:g}·{d} patch tokens, vs the teacher"
    return text + (f" + {ce:g}·cross-entropy on labels" if ce > 0 else "")


def adapter(kind: str, student_dim: int, teacher_dim: int, seed: int,
            hidden_dim: Optional[int]) -> nn.Module:
    """Student width -> teacher target width. frozen/learned: a linear map starting semi-orthogonal
    (seeded); mlp: LayerNorm -> Linear -> GELU -> Linear (Proteus, LightlyTrain), initialised from
    its own seeded stream."""
    if kind in ("frozen", "learned"):
        linear = nn.Linear(student_dim, teacher_dim, bias=False)
        with torch.no_grad():
            linear.weight.copy_(semi_orthogonal(teacher_dim, student_dim, seed))
        return linear
    hidden = hidden_dim or teacher_dim
    # Its own stream: the adapter's init does not depend on what was drawn before it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.LayerNorm(student_dim), nn.Linear(student_dim, hidden), nn.GELU(),
                             nn.Linear(hidden, teacher_dim))


class DistillLoss(nn.Module):
    """Holds the student->teacher adapters (frozen or learned) and the target normalization
    statistics. Its terms (distill_term_names) are unweighted by the mix."""

    def __init__(self, student_dim: int, teacher_dim: int, student_grid: Tuple[int, int],
                 teacher_grid: Tuple[int, int], weights: Dict[str, float],
                 projection: str = "frozen", projection_seed: int = 0, target_norm: str = "none",
                 pooled_targets: bool = False, distances: Union[str, Dict[str, float]] = "cosine",
                 hidden_dim: Optional[int] = None, shared_head: bool = False):
        super().__init__()
        self.weights = dict(weights)
        self.mix = distance_mix(distances)
        for name in self.mix:
            if name not in DISTANCES:
                raise config.ConfigError(f"train.distill_loss: unknown distance '{name}'; "
                                         f"accepted: {', '.join(sorted(DISTANCES))}")
        self.term_names = distill_term_names(self.mix)
        # The teacher cache (teacher_cache.py) stores patch targets already pooled onto the
        # student grid.
        self.pooled_targets = pooled_targets
        self.teacher_grid = tuple(teacher_grid)
        self.target_norm = target_norm
        self.cls_proj = adapter(projection, student_dim, teacher_dim, projection_seed, hidden_dim)
        # A shared head is one module under both names: one set of weights, counted once by
        # parameters() and so by the optimizer.
        self.patch_proj = self.cls_proj if shared_head else adapter(
            projection, student_dim, teacher_dim, projection_seed + 1, hidden_dim)
        for p in self.parameters():
            p.requires_grad_(projection != "frozen")
        for name, src, dst in (("pool_h", teacher_grid[0], student_grid[0]),
                               ("pool_w", teacher_grid[1], student_grid[1])):
            self.register_buffer(name, area_pool_matrix(src, dst), persistent=False)
        # Target statistics stay mean 0 / std 1 (identity) unless target_norm asks for them to be
        # estimated.
        for name in ("cls", "patch"):
            self.register_buffer(f"{name}_mean", torch.zeros(teacher_dim))
            self.register_buffer(f"{name}_std", torch.ones(teacher_dim))

    def set_target_stats(self, cls_mean, cls_std, patch_mean, patch_std) -> None:
        for name, value in (("cls_mean", cls_mean), ("cls_std", cls_std),
                            ("patch_mean", patch_mean), ("patch_std", patch_std)):
            getattr(self, name).copy_(value)

    def normalize_targets(self, t_cls: torch.Tensor,
                          t_patch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._normalize(t_cls, "cls"), self._normalize(t_patch, "patch")

    def _normalize(self, target: torch.Tensor, name: str) -> torch.Tensor:
        if self.target_norm == "none":
            return target
        target = target.float() - getattr(self, f"{name}_mean")
        standardize = self.target_norm == "standardize"
        return target / getattr(self, f"{name}_std") if standardize else target

    @torch.no_grad()
    def cls_cosine(self, s_cls: torch.Tensor, t_cls: torch.Tensor) -> float:
        """Mean cos(P_cls s_cls, CLS target): how close the student's CLS is to what the loss pulls
        it towards."""
        target = self._normalize(t_cls.float(), "cls").float()
        return float(F.cosine_similarity(self.cls_proj(s_cls.float()), target, dim=-1).mean())

    def pool_teacher(self, t_patch: torch.Tensor) -> torch.Tensor:
        return pool_tokens(t_patch, self.teacher_grid, self.pool_h, self.pool_w)

    def forward(self, s_cls, s_patch, t_cls, t_patch) -> Tuple[torch.Tensor, ...]:
        """Returns (total, *terms); teacher tokens are targets (no gradient flows into them)."""
        t_patch = t_patch.detach() if self.pooled_targets else self.pool_teacher(t_patch.detach())
        t_cls, t_patch = self.normalize_targets(t_cls.detach(), t_patch)
        pairs = {"cls": (self.cls_proj(s_cls), t_cls),
                 "patch": (self.patch_proj(s_patch), t_patch)}
        if len(self.mix) == 1:  # the token terms themselves: no mix weight multiplies them
            distance = DISTANCES[next(iter(self.mix))]
            terms = [distance(*pairs[t]) for t in TOKENS]
            total = self.weights["cls"] * terms[0] + self.weights["patch"] * terms[1]
            return (total, *terms)
        total, terms = 0.0, []
        for t in TOKENS:
            for d, mix_weight in self.mix.items():
                terms.append(DISTANCES[d](*pairs[t]))
                total = total + self.weights[t] * mix_weight * terms[-1]
        return (total, *terms)


class LabelLoss(nn.Module):
    """Cross-entropy of a linear head on the student's probe feature (CLS or mean patch token)."""
    term_names = ("ce",)

    def __init__(self, student_dim: int, num_classes: int, use_cls_token: bool):
        super().__init__()
        self.head = nn.Linear(student_dim, num_classes)
        self.use_cls_token = use_cls_token

    def forward(self, s_cls: torch.Tensor, s_patch: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        # The probe's feature (models.pooled_feature), so the head trains on what is probed.
        feature = s_cls if self.use_cls_token else s_patch.mean(dim=1)
        return F.cross_entropy(self.head(feature).float(), labels)


class Criterion(nn.Module):
    """What a run minimises: distillation, cross-entropy on labels, or both (ce_weight).
    forward returns (total, *terms), the terms named by term_names."""

    def __init__(self, distill: Optional[DistillLoss], labels: Optional[LabelLoss],
                 ce_weight: float = 1.0):
        super().__init__()
        self.distill, self.labels, self.ce_weight = distill, labels, ce_weight
        self.term_names = ((distill.term_names if distill is not None else ())
                           + (labels.term_names if labels is not None else ()))

    def forward(self, s_cls, s_patch, t_cls=None, t_patch=None,
                labels=None) -> Tuple[torch.Tensor, ...]:
        if self.distill is None:
            ce = self.labels(s_cls, s_patch, labels)
            return ce, ce.detach()
        total, *terms = self.distill(s_cls, s_patch, t_cls, t_patch)
        if self.labels is not None:
            ce = self.labels(s_cls, s_patch, labels)
            total, terms = total + self.ce_weight * ce, [*terms, ce]
        return (total, *terms)


def build_criterion(cfg: config.Config, student_dim: int, student_grid: Sequence[int],
                    teacher_dim: Optional[int], teacher_grid: Optional[Sequence[int]],
                    num_classes: Optional[int]) -> Criterion:
    """The run's criterion from its config: the one place the trainer and the evaluator build it.

    teacher_dim is the width of the teacher targets (model.teacher_blocks); None builds no
    distillation part (the supervised objective); num_classes None builds no label head (the
    evaluator needs none).
    """
    t, m = cfg.train, cfg.model
    distill = labels = None
    if t.objective == "distill" and teacher_dim is not None:
        distill = DistillLoss(student_dim, teacher_dim, tuple(student_grid), tuple(teacher_grid),
                              t.distill_loss_weights, m.projection, m.projection_seed,
                              m.target_norm, pooled_targets=t.cache_teacher_features,
                              distances=t.distill_loss, hidden_dim=m.projection_hidden_dim,
                              shared_head=m.projection_heads == "shared")
    if uses_labels(t) and num_classes is not None:
        labels = LabelLoss(student_dim, num_classes, m.use_cls_token)
    return Criterion(distill, labels, t.ce_weight)
