"""Feature-distillation loss: student tokens -> projections -> per-token cosine against teacher tokens.

CLS: batch mean of (1 - cos(P_cls s_cls, t_cls)).
Patch: the teacher's token grid (16x16 for ViT-B/14 at 224 px) is area-pooled onto the student's grid (6x6 for
ViT-S/16 at 96 px), so each student token is paired with the teacher tokens covering the same pixels, then the
mean over tokens and batch of (1 - cos(P_patch s_patch, pooled t_patch)).
Total = w_cls * CLS + w_patch * patch.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def area_pool_matrix(src: int, dst: int) -> torch.Tensor:
    """[dst, src] weights: row i holds the overlap of source cell j with destination cell i (rows sum to 1).

    Both grids span the same image, so destination cell i covers source coordinates [i*src/dst, (i+1)*src/dst];
    with 16 -> 6 a teacher token on a cell border is shared by two student tokens in proportion to its overlap.
    """
    edges_dst = torch.arange(dst + 1, dtype=torch.float64) * src / dst
    lo = torch.maximum(edges_dst[:-1, None], torch.arange(src, dtype=torch.float64)[None, :])
    hi = torch.minimum(edges_dst[1:, None], torch.arange(1, src + 1, dtype=torch.float64)[None, :])
    overlap = (hi - lo).clamp(min=0)
    return (overlap / overlap.sum(dim=1, keepdim=True)).float()


def pool_tokens(tokens: torch.Tensor, src_hw: Tuple[int, int], pool_h: torch.Tensor,
                pool_w: torch.Tensor) -> torch.Tensor:
    """[B, Hs*Ws, D] tokens on the source grid -> [B, Hd*Wd, D] on the destination grid (separable area pooling)."""
    b, _, d = tokens.shape
    grid = tokens.reshape(b, src_hw[0], src_hw[1], d)
    pooled = torch.einsum("ih,bhwd,jw->bijd", pool_h.to(tokens.dtype), grid, pool_w.to(tokens.dtype))
    return pooled.reshape(b, -1, d)


def semi_orthogonal(out_dim: int, in_dim: int, seed: int) -> torch.Tensor:
    """A fixed random [out, in] matrix with orthonormal columns (or rows), reproducible from `seed` on any device."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(max(out_dim, in_dim), min(out_dim, in_dim), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))  # sign fix makes Q unique, so the map does not depend on the QR backend
    return (q if out_dim >= in_dim else q.T).float()


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos over all leading dims, computed in fp32."""
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()


class DistillLoss(nn.Module):
    """Holds the student->teacher projections (frozen or learned) and the target normalization statistics."""

    def __init__(self, student_dim: int, teacher_dim: int, student_grid: Tuple[int, int],
                 teacher_grid: Tuple[int, int], weights: Dict[str, float], projection: str = "frozen",
                 projection_seed: int = 0, target_norm: str = "none", pooled_targets: bool = False):
        super().__init__()
        self.weights = dict(weights)
        # The teacher cache (teacher_cache.py) stores patch targets already pooled onto the student grid.
        self.pooled_targets = pooled_targets
        self.teacher_grid = tuple(teacher_grid)
        self.target_norm = target_norm
        self.cls_proj = nn.Linear(student_dim, teacher_dim, bias=False)
        self.patch_proj = nn.Linear(student_dim, teacher_dim, bias=False)
        with torch.no_grad():
            self.cls_proj.weight.copy_(semi_orthogonal(teacher_dim, student_dim, projection_seed))
            self.patch_proj.weight.copy_(semi_orthogonal(teacher_dim, student_dim, projection_seed + 1))
        for p in self.parameters():
            p.requires_grad_(projection == "learned")
        self.register_buffer("pool_h", area_pool_matrix(teacher_grid[0], student_grid[0]), persistent=False)
        self.register_buffer("pool_w", area_pool_matrix(teacher_grid[1], student_grid[1]), persistent=False)
        # Target statistics stay mean 0 / std 1 (identity) unless target_norm asks for them to be estimated.
        for name in ("cls", "patch"):
            self.register_buffer(f"{name}_mean", torch.zeros(teacher_dim))
            self.register_buffer(f"{name}_std", torch.ones(teacher_dim))

    def set_target_stats(self, cls_mean, cls_std, patch_mean, patch_std) -> None:
        for name, value in (("cls_mean", cls_mean), ("cls_std", cls_std), ("patch_mean", patch_mean),
                            ("patch_std", patch_std)):
            getattr(self, name).copy_(value)

    def normalize_targets(self, t_cls: torch.Tensor, t_patch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._normalize(t_cls, "cls"), self._normalize(t_patch, "patch")

    def _normalize(self, target: torch.Tensor, name: str) -> torch.Tensor:
        if self.target_norm == "none":
            return target
        target = target.float() - getattr(self, f"{name}_mean")
        return target / getattr(self, f"{name}_std") if self.target_norm == "standardize" else target

    @torch.no_grad()
    def cls_cosine(self, s_cls: torch.Tensor, t_cls: torch.Tensor) -> float:
        """Mean cos(P_cls s_cls, CLS target): how close the student's CLS is to what the loss pulls it towards."""
        target = self._normalize(t_cls.float(), "cls")
        return float(F.cosine_similarity(self.cls_proj(s_cls.float()), target.float(), dim=-1).mean())

    def pool_teacher(self, t_patch: torch.Tensor) -> torch.Tensor:
        return pool_tokens(t_patch, self.teacher_grid, self.pool_h, self.pool_w)

    def forward(self, s_cls, s_patch, t_cls, t_patch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (total, cls term, patch term); teacher tokens are targets (no gradient flows into them)."""
        t_patch = t_patch.detach() if self.pooled_targets else self.pool_teacher(t_patch.detach())
        t_cls, t_patch = self.normalize_targets(t_cls.detach(), t_patch)
        loss_cls = cosine_distance(self.cls_proj(s_cls), t_cls)
        loss_patch = cosine_distance(self.patch_proj(s_patch), t_patch)
        total = self.weights["cls"] * loss_cls + self.weights["patch"] * loss_patch
        return total, loss_cls, loss_patch
