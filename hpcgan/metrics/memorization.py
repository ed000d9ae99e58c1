"""Memorization audit: is any generated slice a (near) copy of a training slice?

For every generated slice the nearest training slice is found by pixel distance (exhaustive,
memory-bounded blocks) and by SSIM (re-ranking the `ssim_candidates` L2-nearest, which is where any
near-copy is). What counts as "too close" is calibrated on real data: a generated slice is flagged
when it is closer to the training set than all but a `quantile` share of held-out real slices are
(L2 below their 1st percentile, or SSIM above their 99th). Without a held-out set, each training
slice's distance to the *other* training slices stands in for it (leave-one-out); neighbouring
slices of one volume are near-duplicates, so that threshold is lower and flags less.

Distances are RMS per pixel in [-1, 1] units (L2 / sqrt(H*W)), so they read the same at any size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from hpcgan.metrics.msssim import ssim
from hpcgan.metrics.registry import MetricContext, Result, register

_BLOCK_BYTES = 64 << 20
_QUERY_BLOCK = 256


@dataclass
class AuditResult:
    l2: torch.Tensor  # (M,) RMS distance to the nearest training slice
    l2_index: torch.Tensor  # (M,) its index in the training set
    ssim: torch.Tensor  # (M,) highest SSIM with a training slice
    ssim_index: torch.Tensor
    flagged: torch.Tensor  # (M,) bool
    l2_threshold: float
    ssim_threshold: float
    calibration: str  # "heldout" or "leave-one-out"
    pairs_png: str | None = None

    def summary(self) -> dict[str, float | str]:
        q = torch.tensor([0.01, 0.05, 0.5], dtype=torch.float64, device=self.l2.device)
        l2q, ssq = self.l2.double().quantile(q), self.ssim.double().quantile(1 - q)
        out: dict[str, float | str] = {
            "memorization": float(self.flagged.double().mean()),
            "memorization_l2_min": float(self.l2.min()),
            "memorization_l2_p1": float(l2q[0]), "memorization_l2_p5": float(l2q[1]),
            "memorization_l2_median": float(l2q[2]),
            "memorization_l2_threshold": self.l2_threshold,
            "memorization_frac_l2": float((self.l2 < self.l2_threshold).double().mean()),
            "memorization_ssim_max": float(self.ssim.max()),
            "memorization_ssim_p99": float(ssq[0]), "memorization_ssim_p95": float(ssq[1]),
            "memorization_ssim_median": float(ssq[2]),
            "memorization_ssim_threshold": self.ssim_threshold,
            "memorization_frac_ssim": float((self.ssim > self.ssim_threshold).double().mean()),
            "memorization_calibration": self.calibration,
        }
        if self.pairs_png is not None:
            out["memorization_pairs_png"] = self.pairs_png
        return out


def nearest_training(queries: torch.Tensor, train: torch.Tensor, *, ssim_candidates: int = 8,
                     exclude_self: bool = False, block_bytes: int = _BLOCK_BYTES
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L2, L2 index, SSIM, SSIM index) of each query's nearest training slice.

    exclude_self: queries *are* `train`, and a slice may not match itself (leave-one-out).
    """
    q_flat, t_flat = queries.flatten(1).float(), train.flatten(1).float()
    k = min(ssim_candidates, len(train) - int(exclude_self))
    if k < 1:
        raise ValueError("the memorization audit needs at least 2 training slices")
    t_sq = (t_flat * t_flat).sum(1)
    ref_block = max(1, block_bytes // (4 * _QUERY_BLOCK))
    pair_block = max(64, block_bytes // (40 * q_flat.shape[1]))  # SSIM keeps ~10 maps per pair
    l2, l2_idx, best_ssim, ssim_idx = [], [], [], []
    for qs in range(0, len(q_flat), _QUERY_BLOCK):
        q = q_flat[qs:qs + _QUERY_BLOCK]
        q_sq = (q * q).sum(1, keepdim=True)
        best_d = q.new_full((len(q), k), float("inf"))
        best_i = torch.zeros(len(q), k, dtype=torch.long, device=q.device)
        for rs in range(0, len(t_flat), ref_block):
            d = q_sq + t_sq[None, rs:rs + ref_block] - 2 * q @ t_flat[rs:rs + ref_block].T
            if exclude_self:
                cols = torch.arange(rs, rs + d.shape[1], device=q.device)
                rows = torch.arange(qs, qs + len(q), device=q.device)
                d = d.masked_fill(cols[None, :] == rows[:, None], float("inf"))
            best_d, pos = torch.cat([best_d, d], 1).topk(k, dim=1, largest=False)
            # positions < k are the running best, the rest index into this block
            best_i = torch.where(pos < k, best_i.gather(1, pos.clamp(max=k - 1)), pos - k + rs)
        nearest = best_i[:, 0]
        l2.append((q - t_flat[nearest]).pow(2).mean(1).sqrt())  # exact, not the expanded form
        l2_idx.append(nearest)
        q_img = queries[qs:qs + _QUERY_BLOCK].float()
        owner = torch.arange(len(q), device=q.device).repeat_interleave(k)
        cand = best_i.flatten()
        scores = torch.cat([ssim(q_img[owner[s:s + pair_block]], train[cand[s:s + pair_block]].float())
                            for s in range(0, len(cand), pair_block)]).view(len(q), k)
        top, arg = scores.max(dim=1)
        best_ssim.append(top)
        ssim_idx.append(best_i.gather(1, arg[:, None])[:, 0])
    return torch.cat(l2), torch.cat(l2_idx), torch.cat(best_ssim), torch.cat(ssim_idx)


def _to_uint8(img: torch.Tensor) -> torch.Tensor:
    return ((img[0].float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def save_pairs_png(fake: torch.Tensor, train: torch.Tensor, l2: torch.Tensor, l2_index: torch.Tensor,
                   path: str | Path, *, pairs: int = 16, per_row: int = 4) -> Path:
    """The closest (generated | nearest training) pairs, closest first, row-major, on a white grid."""
    order = l2.argsort()[:pairs].tolist()
    h, w = fake.shape[-2:]
    gap, tile_w = 2, 2 * w + 2
    rows = (len(order) + per_row - 1) // per_row
    canvas = torch.full((rows * (h + 3 * gap) + 3 * gap, per_row * (tile_w + 3 * gap) + 3 * gap), 255,
                        dtype=torch.uint8)
    for slot, i in enumerate(order):
        y = 3 * gap + (slot // per_row) * (h + 3 * gap)
        x = 3 * gap + (slot % per_row) * (tile_w + 3 * gap)
        canvas[y:y + h, x:x + w] = _to_uint8(fake[i])
        canvas[y:y + h, x + w + gap:x + 2 * w + gap] = _to_uint8(train[int(l2_index[i])])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas.numpy()).save(path)
    return path


def memorization_audit(train: torch.Tensor, fake: torch.Tensor, *, heldout: torch.Tensor | None = None,
                       quantile: float = 0.01, ssim_candidates: int = 8, out_path: str | Path | None = None,
                       block_bytes: int = _BLOCK_BYTES) -> AuditResult:
    """Nearest training slice of every generated slice, flagged against a real-vs-real threshold."""
    fake = fake.to(train.device)
    l2, l2_idx, sim, sim_idx = nearest_training(fake, train, ssim_candidates=ssim_candidates,
                                                block_bytes=block_bytes)
    if heldout is not None:
        cal_l2, _, cal_ssim, _ = nearest_training(heldout.to(train.device), train,
                                                  ssim_candidates=ssim_candidates, block_bytes=block_bytes)
        calibration = "heldout"
    else:
        cal_l2, _, cal_ssim, _ = nearest_training(train, train, ssim_candidates=ssim_candidates,
                                                  exclude_self=True, block_bytes=block_bytes)
        calibration = "leave-one-out"
    l2_thr = float(cal_l2.double().quantile(quantile))
    ssim_thr = float(cal_ssim.double().quantile(1 - quantile))
    png = str(save_pairs_png(fake, train, l2, l2_idx, out_path)) if out_path is not None else None
    return AuditResult(l2=l2, l2_index=l2_idx, ssim=sim, ssim_index=sim_idx,
                       flagged=(l2 < l2_thr) | (sim > ssim_thr), l2_threshold=l2_thr, ssim_threshold=ssim_thr,
                       calibration=calibration, pairs_png=png)


@register("memorization")
def _memorization(ctx: MetricContext) -> Result:
    """Audits against the evaluation's real set; a full audit passes the whole training set."""
    out_path = ctx.out_dir / "memorization_pairs.png" if ctx.out_dir is not None else None
    return memorization_audit(ctx.real, ctx.fake, heldout=ctx.heldout, out_path=out_path).summary()
