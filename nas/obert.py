"""Second-order (oBERT) pruning math: block Fisher inverse, OBS scores and updates.

Kurtic et al. 2022, "The Optimal BERT Surgeon", approximate the loss around the
trained weights ``w*`` by a quadratic whose Hessian is the dampened empirical
Fisher ``F = lambda I + (1/m) sum_i g_i g_i^T`` of ``m`` loss gradients. Removing
a set ``Q`` of weights (``w_Q -> 0``) and letting the others move to the best
compensating values costs ``rho_Q = 1/2 w_Q^T ([F^-1]_QQ)^-1 w_Q`` (the OBS
saliency), and the optimal move is ``dw = -F^-1[:, Q] ([F^-1]_QQ)^-1 w_Q``.
Only ``F^-1`` is ever needed, so it is built directly from the gradients with
Woodbury (Sherman-Morrison) rank-1 updates, never by inverting ``F``; it is kept
block-diagonal over ``block_size`` consecutive weights so the memory is
``num_weights * block_size`` rather than ``num_weights^2``.

Three granularities share that math:
- unstructured: ``Q`` is one weight, ``rho_j = w_j^2 / (2 [F^-1]_jj)``;
- semi-structured: ``Q`` is a group of ``group_size`` consecutive weights (the
  paper's 4-blocks), scored jointly;
- structured (heads, FFN neurons): the "weights" are multiplicative masks, all
  equal to 1, over one layer's ``k`` structures; ``k`` is small so the Fisher
  inverse over masks is kept dense.

Convention: pruning functions return a *keep* mask (``True`` = survives), so
``w.mul_(mask)`` re-applies it after an optimiser step during gradual pruning;
:func:`obs_update` takes the complementary *prune* mask (``True`` = removed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

__all__ = [
    "DEFAULT_DAMPING",
    "BlockFisherInverse",
    "cubic_sparsity",
    "group_scores",
    "magnitude_prune",
    "num_to_prune",
    "obs_update",
    "prune_weights",
    "structured_fisher_inverse",
    "structured_scores",
    "structured_update",
    "unstructured_scores",
]

DEFAULT_DAMPING = 1e-7
"""The paper's lambda for gradients of the mean (mini-batch) loss of BERT.

lambda only matters relative to the Fisher's scale ``~ mean(g^2)``: scaling the
gradients by ``c`` and lambda by ``c^2`` leaves every score ranking and every OBS
update unchanged. With mean-reduced cross-entropy gradients of fine-tuned BERT,
``g^2`` is far above 1e-7, so the damping only regularises the directions no
gradient spans. If gradients are summed over a batch instead of averaged, scale
lambda by the batch size squared.
"""


class BlockFisherInverse:
    """Inverse of the block-diagonal dampened empirical Fisher, built by Woodbury updates.

    Each block starts at ``(1/lambda) I`` and every gradient ``g`` applies
    ``Finv <- Finv - (Finv g)(Finv g)^T / (m + g^T Finv g)``. After all ``m``
    gradients this is exactly ``(lambda I + (1/m) sum g g^T)^-1`` per block, so
    ``m`` must be the *total* number of gradients before the first one is
    applied. Two exact ways to use it:

    - ``num_grads=None`` (default): call :meth:`update` once with all ``m``
      gradients; ``m`` is their number and further calls raise.
    - ``num_grads=m``: ``m`` is fixed up front and :meth:`update` may be called
      with chunks (e.g. one per mini-batch) until ``m`` gradients were seen.

    :meth:`diag` and :attr:`blocks` raise until all ``m`` gradients are in,
    because a partial inverse would silently mis-weight the Fisher.

    When ``num_weights`` is not a multiple of ``block_size``, the gradients are
    zero-padded: the padded coordinates stay decoupled at ``1/lambda`` and are
    never exposed by :meth:`diag`, so the last (ragged) block is exact.
    """

    def __init__(
        self,
        num_weights: int,
        block_size: int,
        damping: float,
        *,
        num_grads: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if num_weights < 1 or block_size < 1:
            raise ValueError("num_weights and block_size must be positive")
        if damping <= 0:
            raise ValueError("damping must be positive: it keeps the Fisher invertible")
        if num_grads is not None and num_grads < 1:
            raise ValueError("num_grads must be positive")
        self.num_weights = num_weights
        self.block_size = block_size
        self.damping = damping
        self.num_grads = num_grads
        self.seen = 0
        self._single_call = num_grads is None
        self.num_blocks = math.ceil(num_weights / block_size)
        eye = torch.eye(block_size, dtype=dtype, device=device) / damping
        self._blocks = eye.expand(self.num_blocks, block_size, block_size).clone()

    @property
    def dtype(self) -> torch.dtype:
        return self._blocks.dtype

    @property
    def device(self) -> torch.device:
        return self._blocks.device

    @property
    def complete(self) -> bool:
        """Whether all ``m`` gradients were applied (vacuously true before the first update)."""
        return self.num_grads is None or self.seen == self.num_grads

    @property
    def blocks(self) -> torch.Tensor:
        """The inverse blocks, ``[num_blocks, block_size, block_size]`` (padding included)."""
        self._check_complete()
        return self._blocks

    def update(self, grads: torch.Tensor) -> None:
        """Apply one rank-1 Woodbury update per row of ``grads`` (``[n, num_weights]``).

        Sequential in the gradients (each update needs the previous inverse) but
        vectorised over all blocks with batched einsum/baddbmm.
        """
        grads = self._padded_grads(grads)
        self._claim(grads.shape[0])
        m = float(self.num_grads or 0)
        for g in grads:  # Sherman-Morrison is sequential in the gradients
            finv_g = torch.einsum("bij,bj->bi", self._blocks, g)
            scale = (m + torch.einsum("bi,bi->b", g, finv_g)).sqrt().unsqueeze(1)
            u = finv_g / scale
            self._blocks.baddbmm_(u.unsqueeze(2), u.unsqueeze(1), alpha=-1.0)

    def diag(self) -> torch.Tensor:
        """``[F^-1]_jj`` per weight, ``[num_weights]``: the unstructured scores' denominator."""
        return self.blocks.diagonal(dim1=1, dim2=2).reshape(-1)[: self.num_weights]

    def dense(self) -> torch.Tensor:
        """The full ``[num_weights, num_weights]`` inverse; for checks on small problems only."""
        return torch.block_diag(*self.blocks)[: self.num_weights, : self.num_weights]

    def _padded_grads(self, grads: torch.Tensor) -> torch.Tensor:
        """Gradients as ``[n, num_blocks, block_size]`` in the inverse's dtype, zero-padded."""
        if grads.dim() != 2 or grads.shape[1] != self.num_weights:
            raise ValueError(f"grads must be [n, {self.num_weights}], got {tuple(grads.shape)}")
        grads = grads.detach().to(dtype=self.dtype, device=self.device)
        pad = self.num_blocks * self.block_size - self.num_weights
        grads = torch.nn.functional.pad(grads, (0, pad))
        return grads.reshape(grads.shape[0], self.num_blocks, self.block_size)

    def _claim(self, n: int) -> None:
        """Fix or check ``m`` before any update, since every rank-1 step divides by it."""
        if n < 1:
            raise ValueError("update() needs at least one gradient")
        if self._single_call:
            if self.seen:
                raise RuntimeError("without num_grads, update() takes all gradients in one call")
            self.num_grads = n
        elif self.num_grads is not None and self.seen + n > self.num_grads:
            raise ValueError(f"{self.seen + n} gradients exceed num_grads={self.num_grads}")
        self.seen += n

    def _check_complete(self) -> None:
        if not self.complete:
            raise RuntimeError(f"only {self.seen} of num_grads={self.num_grads} gradients applied")


def _as_blocks(x: torch.Tensor, finv: BlockFisherInverse, dtype: torch.dtype) -> torch.Tensor:
    """``x`` flattened, zero-padded and viewed as ``[num_blocks, block_size]``."""
    if x.numel() != finv.num_weights:
        raise ValueError(f"expected {finv.num_weights} weights, got {x.numel()}")
    flat = x.detach().reshape(-1).to(dtype=dtype, device=finv.device)
    pad = finv.num_blocks * finv.block_size - finv.num_weights
    return torch.nn.functional.pad(flat, (0, pad)).reshape(finv.num_blocks, finv.block_size)


def unstructured_scores(w: torch.Tensor, finv: BlockFisherInverse) -> torch.Tensor:
    """OBS saliency ``rho_j = w_j^2 / (2 [F^-1]_jj)`` of each weight, shaped like ``w``.

    ``rho_j`` is the loss increase of removing ``w_j`` alone after the optimal
    compensation of the rest of its block; it is in the inverse's dtype.
    """
    flat = w.detach().reshape(-1).to(dtype=finv.dtype, device=finv.device)
    return (flat.square() / (2 * finv.diag())).reshape(w.shape)


def _check_groups(num_weights: int, block_size: int, group_size: int) -> None:
    """Groups must tile the weights and never straddle two Fisher blocks."""
    if group_size < 1 or block_size % group_size:
        raise ValueError(f"block_size {block_size} must be a multiple of group_size {group_size}")
    if num_weights % group_size:
        raise ValueError(f"{num_weights} weights do not split into groups of {group_size}")


def _group_inverse_blocks(finv: BlockFisherInverse, group_size: int) -> torch.Tensor:
    """``[F^-1]_QQ`` for every group, ``[num_groups, group_size, group_size]``."""
    per_block = finv.block_size // group_size
    blocks = finv.blocks.reshape(finv.num_blocks, per_block, group_size, per_block, group_size)
    diagonal = blocks.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
    return diagonal.reshape(-1, group_size, group_size)[: finv.num_weights // group_size]


def group_scores(w: torch.Tensor, finv: BlockFisherInverse, group_size: int) -> torch.Tensor:
    """Joint OBS saliency ``1/2 w_Q^T ([F^-1]_QQ)^-1 w_Q`` of consecutive groups, ``[num_groups]``.

    Scoring a group jointly accounts for the correlation of its weights, which
    scoring them one by one and summing would miss. Groups follow ``w``'s
    row-major flattening, so groups of 4 along a row are the paper's 4-blocks.
    """
    _check_groups(finv.num_weights, finv.block_size, group_size)
    w_q = w.detach().reshape(-1, group_size).to(dtype=finv.dtype, device=finv.device)
    f_qq = _group_inverse_blocks(finv, group_size)
    solved = torch.linalg.solve(f_qq, w_q.unsqueeze(-1)).squeeze(-1)
    return 0.5 * (w_q * solved).sum(-1)


def obs_update(w: torch.Tensor, finv: BlockFisherInverse, prune_mask: torch.Tensor) -> torch.Tensor:
    """Weights after removing ``prune_mask`` (``True`` = pruned) with the optimal OBS correction.

    Within each Fisher block with pruned set ``Q``,
    ``dw = -F^-1[:, Q] ([F^-1]_QQ)^-1 w_Q`` minimises the quadratic loss subject
    to ``w_Q = 0``; blocks are independent, so all are updated at once, batched
    by their number of pruned weights. Blocks with nothing pruned are left
    unchanged and the pruned entries are set to exactly 0 (the update only
    reaches them up to rounding). Returned in ``w``'s shape, dtype and device.
    """
    if prune_mask.shape != w.shape:
        raise ValueError(f"prune_mask {tuple(prune_mask.shape)} does not match w {tuple(w.shape)}")
    wb = _as_blocks(w, finv, finv.dtype)
    qb = _as_blocks(prune_mask.bool(), finv, torch.bool)
    delta = torch.zeros_like(wb)
    counts = qb.sum(1)
    for k in counts.unique().tolist():
        if k:
            rows = (counts == k).nonzero().squeeze(1)
            delta[rows] = _block_corrections(finv.blocks, wb, qb, rows, k)
    new = (wb + delta).masked_fill(qb, 0.0).reshape(-1)[: finv.num_weights]
    return new.reshape(w.shape).to(dtype=w.dtype, device=w.device)


def _block_corrections(
    blocks: torch.Tensor, wb: torch.Tensor, qb: torch.Tensor, rows: torch.Tensor, k: int
) -> torch.Tensor:
    """``-F^-1[:, Q] ([F^-1]_QQ)^-1 w_Q`` for the blocks ``rows``, which all have ``|Q| = k``.

    Advanced indexing gathers only the ``k`` needed columns, so no block is copied whole.
    """
    order = torch.argsort(qb[rows].to(torch.uint8), dim=1, descending=True, stable=True)
    q = order[:, :k]  # [r, k]: the pruned positions of each block
    r = rows.unsqueeze(1)
    f_cols = blocks[r, :, q]  # [r, k, B]: row i of F^-1[:, Q]^T (symmetric)
    f_qq = blocks[r.unsqueeze(2), q.unsqueeze(2), q.unsqueeze(1)]  # [r, k, k]
    w_q = torch.gather(wb[rows], 1, q)
    solved = torch.linalg.solve(f_qq, w_q.unsqueeze(-1)).squeeze(-1)  # [r, k]
    return -torch.einsum("rkb,rk->rb", f_cols, solved)


def num_to_prune(sparsity: float, count: int) -> int:
    """``floor(sparsity * count)``: never prunes more than asked.

    The product is rounded to 6 decimals first so that float noise
    (``0.29 * 100 == 28.999999999999996``) does not lose a unit.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return math.floor(round(sparsity * count, 6))


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` smallest scores (ties broken by position, deterministically)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.argsort(scores.reshape(-1), stable=True)[:k]] = True
    return mask


def prune_weights(
    w: torch.Tensor,
    grads: torch.Tensor,
    sparsity: float,
    *,
    block_size: int = 50,
    damping: float = DEFAULT_DAMPING,
    group_size: int = 1,
    update: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-shot oBERT pruning of one tensor to ``sparsity``; returns ``(new_w, keep_mask)``.

    ``grads`` are ``m`` loss gradients w.r.t. ``w`` (``[m, *w.shape]`` or
    ``[m, w.numel()]``). The ``floor(sparsity * units)`` lowest-saliency units
    are removed, where a unit is a weight (``group_size == 1``) or a group of
    ``group_size`` consecutive weights; ``block_size`` must then be a multiple
    of ``group_size`` (e.g. 48 for 4-blocks; the paper's 50 is for weights).
    With ``update`` the survivors get the OBS correction, otherwise the pruned
    weights are just zeroed (scores still second-order).
    """
    finv = BlockFisherInverse(w.numel(), block_size, damping, dtype=dtype, device=w.device)
    finv.update(grads.reshape(grads.shape[0], -1))
    if group_size == 1:
        scores = unstructured_scores(w, finv).reshape(-1)
    else:
        scores = group_scores(w, finv, group_size)
    prune = _lowest(scores, num_to_prune(sparsity, scores.numel()))
    prune = prune.repeat_interleave(group_size).reshape(w.shape)
    new_w = obs_update(w, finv, prune) if update else w.detach().masked_fill(prune, 0.0)
    return new_w, ~prune


def magnitude_prune(
    w: torch.Tensor, sparsity: float, group_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude baseline: zero the ``floor(sparsity * units)`` smallest |w| (or group L2 norms).

    Same units, rounding and return convention as :func:`prune_weights`, so the
    two compare like for like.
    """
    if w.numel() % group_size:
        raise ValueError(f"{w.numel()} weights do not split into groups of {group_size}")
    norms = w.detach().reshape(-1, group_size).norm(dim=1)
    prune = _lowest(norms, num_to_prune(sparsity, norms.numel()))
    prune = prune.repeat_interleave(group_size).reshape(w.shape)
    return w.detach().masked_fill(prune, 0.0), ~prune


def structured_fisher_inverse(
    mask_grads: torch.Tensor,
    damping: float,
    *,
    method: Literal["direct", "woodbury"] = "direct",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Dense ``(lambda I + G^T G / n)^-1`` over one layer's ``k`` mask variables, ``[k, k]``.

    ``k`` (heads or FFN neurons, at most a few thousand) is small enough for a
    full inverse, which keeps the correlations between all structures of the
    layer. ``direct`` uses a Cholesky inverse (``O(n k^2 + k^3)``, fastest for
    many gradients); ``woodbury`` applies ``n`` rank-1 updates (one block of
    :class:`BlockFisherInverse`). float64 by default: with small lambda the
    mask Fisher is badly conditioned.
    """
    if mask_grads.dim() != 2:
        raise ValueError(f"mask_grads must be [n, k], got {tuple(mask_grads.shape)}")
    n, k = mask_grads.shape
    if method == "woodbury":
        finv = BlockFisherInverse(k, k, damping, dtype=dtype, device=mask_grads.device)
        finv.update(mask_grads)
        return finv.blocks[0]
    g = mask_grads.detach().to(dtype)
    fisher = g.T @ g / n + damping * torch.eye(k, dtype=dtype, device=g.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(fisher))


def relative_damping(grads: torch.Tensor, relative: float) -> float:
    """lambda relative to the Fisher's scale mean(g^2): no ranking depends on the loss scale."""
    return relative * float(grads.double().pow(2).mean().clamp_min(1e-30))


def structured_scores(
    mask_grads: torch.Tensor,
    damping: float,
    *,
    method: Literal["direct", "woodbury"] = "direct",
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OBS saliency of removing each head/neuron, ``rho_j = 1/(2 [F^-1]_jj)``, and ``F^-1``.

    A structure ``j`` is removed by taking its mask ``m_j`` from 1 to 0, so the
    unstructured formula ``m_j^2 / (2 [F^-1]_jj)`` reduces to ``1 / (2 [F^-1]_jj)``.
    ``mask_grads`` are ``[n, k]`` loss gradients w.r.t. the ``k`` masks of one
    layer (all masks equal to 1). Returns ``(scores [k], finv [k, k])``; pass
    ``finv`` to :func:`structured_update`.
    """
    finv = structured_fisher_inverse(mask_grads, damping, method=method, dtype=dtype)
    return 1.0 / (2.0 * finv.diagonal()), finv


def structured_update(finv: torch.Tensor, prune: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """New mask values ``[k]`` after removing the structures ``prune`` with the OBS correction.

    ``m_new = 1 - F^-1[:, Q] ([F^-1]_QQ)^-1 1_Q`` with ``m_new[Q] = 0``. The
    surviving masks are generally not 1 any more; fold them into the weights
    they gate (for a head, scale its columns of the attention output projection;
    for an FFN neuron, its column of the FFN output dense) and drop the removed
    heads' Q/K/V rows and output columns, or the removed neurons' rows of the
    intermediate dense and columns of the output dense. The result is smaller
    *dense* matrices with no mask left, which a compiler turns into real speed-up
    (unlike unstructured sparsity).
    """
    k = finv.shape[0]
    q = torch.as_tensor(prune, dtype=torch.long, device=finv.device).reshape(-1)
    masks = torch.ones(k, dtype=finv.dtype, device=finv.device)
    if q.numel() == 0:
        return masks
    ones = torch.ones(q.numel(), dtype=finv.dtype, device=finv.device)
    solved = torch.linalg.solve(finv[q][:, q], ones)
    masks = masks - finv[:, q] @ solved
    masks[q] = 0.0
    return masks


def cubic_sparsity(
    step: int,
    total_steps: int,
    initial: float,
    final: float,
    start: int = 0,
    end: int | None = None,
) -> float:
    """Cubic gradual schedule (Zhu & Gupta 2017): ``s_f + (s_i - s_f) (1 - (t - t0)/n)^3``.

    Sparsity rises fast while the network has many redundant weights and slows
    as it approaches ``final``, giving fine-tuning more steps to recover at high
    sparsity. ``t0 = start`` and ``n = end - start`` with ``end`` defaulting to
    ``total_steps`` (set it earlier to leave steps for fine-tuning at the final
    sparsity). ``step`` is clamped to ``[start, end]``: ``initial`` before, ``final`` after.
    """
    end = total_steps if end is None else end
    if not 0 <= start <= end <= total_steps:
        raise ValueError(f"need 0 <= start ({start}) <= end ({end}) <= total_steps ({total_steps})")
    if end == start:
        return final if step >= start else initial
    progress = min(max((step - start) / (end - start), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3
