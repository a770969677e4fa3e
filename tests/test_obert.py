"""oBERT math against dense brute force on small quadratic problems (CPU, float64)."""

from __future__ import annotations

import itertools

import pytest
import torch

from canao.nas.obert import (
    BlockFisherInverse,
    cubic_sparsity,
    group_scores,
    magnitude_prune,
    num_to_prune,
    obs_update,
    prune_weights,
    structured_fisher_inverse,
    structured_scores,
    structured_update,
    unstructured_scores,
)

F64 = torch.float64
NUM_WEIGHTS, BLOCK, NUM_GRADS, DAMPING = 23, 8, 16, 1e-2  # 23 = 8 + 8 + 7: a ragged last block


def dense_block_fisher(grads: torch.Tensor, block: int, damping: float) -> torch.Tensor:
    """``lambda I + G^T G / m`` with the entries outside the diagonal blocks zeroed."""
    m, d = grads.shape
    fisher = grads.T @ grads / m + damping * torch.eye(d, dtype=grads.dtype)
    ids = torch.arange(d) // block
    return fisher * (ids[:, None] == ids[None, :])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def quadratic_loss(w: torch.Tensor, w_star: torch.Tensor, fisher: torch.Tensor) -> float:
    """``1/2 (w - w*)^T F (w - w*)``: the local model oBERT's scores are exact for."""
    dw = (w - w_star).reshape(-1)
    return float(0.5 * dw @ fisher @ dw)


@pytest.fixture
def problem() -> tuple[torch.Tensor, torch.Tensor, BlockFisherInverse, torch.Tensor]:
    """``(w*, F, Finv, grads)`` for a 23-weight layer with 8-blocks, in float64."""
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(NUM_GRADS, NUM_WEIGHTS, generator=gen, dtype=F64)
    w_star = torch.randn(NUM_WEIGHTS, generator=gen, dtype=F64)
    finv = BlockFisherInverse(NUM_WEIGHTS, BLOCK, DAMPING, dtype=F64)
    finv.update(grads)
    return w_star, dense_block_fisher(grads, BLOCK, DAMPING), finv, grads


def assert_constrained_minimum(
    w_new: torch.Tensor, w_star: torch.Tensor, fisher: torch.Tensor, pruned: torch.Tensor
) -> None:
    """No other correction of the unpruned weights (with ``w_Q = 0``) has a lower loss."""
    gen = torch.Generator().manual_seed(1)
    base = quadratic_loss(w_new, w_star, fisher)
    for _ in range(20):
        d = torch.randn(w_new.shape, generator=gen, dtype=F64).masked_fill(pruned, 0.0)
        assert quadratic_loss(w_new + 1e-3 * d, w_star, fisher) > base


# --- BlockFisherInverse -------------------------------------------------------------------------


@pytest.mark.parametrize("damping", [1e-2, 1e-7])
def test_block_inverse_matches_dense_inverse(damping: float) -> None:
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(NUM_GRADS, NUM_WEIGHTS, generator=gen, dtype=F64)
    finv = BlockFisherInverse(NUM_WEIGHTS, BLOCK, damping, dtype=F64)
    finv.update(grads)
    expected = torch.linalg.inv(dense_block_fisher(grads, BLOCK, damping))
    assert finv.blocks.shape == (3, BLOCK, BLOCK)
    assert finv.num_grads == finv.seen == NUM_GRADS
    assert rel_err(finv.dense(), expected) < 1e-8
    assert rel_err(finv.diag(), expected.diagonal()) < 1e-8


def test_chunked_updates_with_num_grads_equal_one_call(problem) -> None:
    _, _, whole, grads = problem
    chunked = BlockFisherInverse(NUM_WEIGHTS, BLOCK, DAMPING, num_grads=NUM_GRADS, dtype=F64)
    chunked.update(grads[:5])
    assert not chunked.complete
    with pytest.raises(RuntimeError, match="5 of num_grads=16"):
        _ = chunked.blocks
    chunked.update(grads[5:])
    assert torch.allclose(chunked.blocks, whole.blocks, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="exceed"):
        chunked.update(grads[:1])


def test_without_num_grads_update_is_single_call(problem) -> None:
    _, _, finv, grads = problem
    with pytest.raises(RuntimeError, match="one call"):
        finv.update(grads)
    with pytest.raises(ValueError, match=r"\[n, 23\]"):
        BlockFisherInverse(NUM_WEIGHTS, BLOCK, DAMPING).update(grads[:, :5])


def test_float32_is_the_default() -> None:
    finv = BlockFisherInverse(10, 4, 1e-7)
    assert finv.blocks.dtype == torch.float32
    assert torch.allclose(finv.diag(), torch.full((10,), 1e7))


# --- scores and OBS update on a quadratic ------------------------------------------------------


def test_single_weight_removal_costs_its_score(problem) -> None:
    w_star, fisher, finv, _ = problem
    dense_inv = torch.linalg.inv(fisher)
    scores = unstructured_scores(w_star, finv)
    assert rel_err(scores, w_star.square() / (2 * dense_inv.diagonal())) < 1e-8
    for j in (0, 9, 22):  # first block, middle block, ragged last block
        pruned = torch.zeros(NUM_WEIGHTS, dtype=torch.bool)
        pruned[j] = True
        w_new = obs_update(w_star, finv, pruned)
        assert w_new[j] == 0
        increase = quadratic_loss(w_new, w_star, fisher)
        assert increase == pytest.approx(float(scores[j]), rel=1e-8)
        assert_constrained_minimum(w_new, w_star, fisher, pruned)


def test_group_removal_costs_its_group_score(problem) -> None:
    w_star, _, _, grads = problem
    w, grads = w_star[:20], grads[:, :20]  # 20 weights: blocks 8 + 8 + 4, five 4-groups
    finv = BlockFisherInverse(20, BLOCK, DAMPING, dtype=F64)
    finv.update(grads)
    fisher = dense_block_fisher(grads, BLOCK, DAMPING)
    dense_inv = torch.linalg.inv(fisher)
    scores = group_scores(w, finv, 4)
    assert scores.shape == (5,)
    for g in range(5):
        q = slice(4 * g, 4 * g + 4)
        expected = 0.5 * w[q] @ torch.linalg.solve(dense_inv[q, q], w[q])
        assert float(scores[g]) == pytest.approx(float(expected), rel=1e-8)
        pruned = torch.zeros(20, dtype=torch.bool)
        pruned[q] = True
        w_new = obs_update(w, finv, pruned)
        assert torch.all(w_new[q] == 0)
        assert quadratic_loss(w_new, w, fisher) == pytest.approx(float(scores[g]), rel=1e-8)
        assert_constrained_minimum(w_new, w, fisher, pruned)


def test_group_scores_need_aligned_groups(problem) -> None:
    w_star, _, finv, _ = problem
    with pytest.raises(ValueError, match="do not split"):
        group_scores(w_star, finv, 4)  # 23 weights
    with pytest.raises(ValueError, match="multiple"):
        group_scores(w_star, finv, 3)


def test_obs_update_with_ragged_sets_matches_brute_force(problem) -> None:
    """Several blocks pruned at once, with different |Q| and one block untouched."""
    w_star, fisher, finv, _ = problem
    pruned = torch.zeros(NUM_WEIGHTS, dtype=torch.bool)
    pruned[[1, 2, 5, 16, 20, 21, 22]] = True  # |Q| = 3, 0, 4 per block
    w_new = obs_update(w_star, finv, pruned)
    dense_inv = torch.linalg.inv(fisher)
    q = pruned.nonzero().squeeze(1)
    expected = w_star - dense_inv[:, q] @ torch.linalg.solve(dense_inv[q][:, q], w_star[q])
    expected[q] = 0
    assert rel_err(w_new, expected) < 1e-8
    assert torch.equal(w_new[8:16], w_star[8:16])  # no pruned weight in block 2: unchanged
    predicted = 0.5 * w_star[q] @ torch.linalg.solve(dense_inv[q][:, q], w_star[q])
    assert quadratic_loss(w_new, w_star, fisher) == pytest.approx(float(predicted), rel=1e-8)
    assert_constrained_minimum(w_new, w_star, fisher, pruned)


def test_obs_update_keeps_shape_and_dtype() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(4, 6, generator=gen)
    finv = BlockFisherInverse(24, 8, 1e-3)
    finv.update(torch.randn(10, 24, generator=gen))
    pruned = torch.zeros(4, 6, dtype=torch.bool)
    pruned[0, :4] = True
    w_new = obs_update(w, finv, pruned)
    assert w_new.shape == w.shape and w_new.dtype == w.dtype
    assert torch.all(w_new[pruned] == 0)
    assert unstructured_scores(w, finv).shape == w.shape


# --- one-shot pruning --------------------------------------------------------------------------


@pytest.fixture
def layer() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(16, 12, generator=gen), torch.randn(32, 16, 12, generator=gen)


@pytest.mark.parametrize(("sparsity", "pruned"), [(0.5, 96), (0.333, 63), (0.9, 172), (1.0, 192)])
@pytest.mark.parametrize("update", [True, False])
def test_unstructured_pruning_hits_floor_of_sparsity(layer, sparsity, pruned, update) -> None:
    w, grads = layer
    new_w, keep = prune_weights(w, grads, sparsity, block_size=8, damping=1e-3, update=update)
    assert new_w.shape == w.shape and keep.dtype == torch.bool
    assert int((new_w == 0).sum()) == int((~keep).sum()) == pruned
    assert torch.all(new_w[keep] != 0)


@pytest.mark.parametrize(("sparsity", "groups"), [(0.5, 24), (0.3, 14), (0.75, 36)])
def test_group_pruning_zeroes_whole_groups(layer, sparsity, groups) -> None:
    w, grads = layer  # 192 weights = 48 groups of 4
    for new_w, keep in (
        prune_weights(w, grads, sparsity, block_size=8, damping=1e-3, group_size=4),
        magnitude_prune(w, sparsity, group_size=4),
    ):
        zero = (new_w == 0).reshape(-1, 4)
        assert torch.equal(zero, ~keep.reshape(-1, 4))
        assert torch.all(zero.all(1) | ~zero.any(1))  # each group all zero or none
        assert int(zero.all(1).sum()) == groups


def test_group_pruning_rejects_misaligned_blocks(layer) -> None:
    w, grads = layer
    with pytest.raises(ValueError, match="multiple of group_size"):
        prune_weights(w, grads, 0.5, group_size=4)  # default block_size 50


def test_magnitude_prune_removes_smallest() -> None:
    w = torch.tensor([[0.1, -3.0, 0.2, 5.0], [-0.05, 1.0, 2.0, -0.3]])
    new_w, keep = magnitude_prune(w, 0.29)  # floor(0.29 * 8) = 2
    assert torch.equal(new_w == 0, torch.tensor([[True] + [False] * 3, [True] + [False] * 3]))
    assert torch.equal(keep, new_w != 0)
    groups, _ = magnitude_prune(w, 0.5, group_size=2)  # norms ~3.0, 5.0, 1.0, 2.0
    assert torch.equal(groups, torch.tensor([[0.1, -3.0, 0.2, 5.0], [0.0, 0.0, 0.0, 0.0]]))


def test_num_to_prune_rounds_down_robustly() -> None:
    assert num_to_prune(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996
    assert num_to_prune(0.333, 192) == 63
    assert num_to_prune(0.0, 10) == 0 and num_to_prune(1.0, 10) == 10
    with pytest.raises(ValueError):
        num_to_prune(1.5, 10)


def test_obs_update_beats_plain_zeroing_on_the_same_mask(layer) -> None:
    w, grads = layer
    w64, g64 = w.to(F64).reshape(-1), grads.to(F64).reshape(32, -1)
    fisher = dense_block_fisher(g64, 8, 1e-3)
    with_update, keep = prune_weights(w64, g64, 0.5, block_size=8, damping=1e-3, dtype=F64)
    zeroed, keep2 = prune_weights(
        w64, g64, 0.5, block_size=8, damping=1e-3, dtype=F64, update=False
    )
    assert torch.equal(keep, keep2)
    assert quadratic_loss(with_update, w64, fisher) < quadratic_loss(zeroed, w64, fisher)


# --- structured (masks over heads / neurons) ---------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(32, 12), (16, 40)])
def test_structured_woodbury_matches_direct(n: int, k: int) -> None:
    grads = torch.randn(n, k, generator=torch.Generator().manual_seed(4), dtype=F64)
    direct = structured_fisher_inverse(grads, 1e-3)
    woodbury = structured_fisher_inverse(grads, 1e-3, method="woodbury")
    assert rel_err(woodbury, direct) < 1e-8
    fisher = grads.T @ grads / n + 1e-3 * torch.eye(k, dtype=F64)
    assert rel_err(direct, torch.linalg.inv(fisher)) < 1e-8
    scores, finv = structured_scores(grads, 1e-3, method="woodbury")
    assert rel_err(scores, 0.5 / direct.diagonal()) < 1e-8 and finv.shape == (k, k)


def test_structured_update_costs_predicted_increase() -> None:
    n, k = 24, 12
    grads = torch.randn(n, k, generator=torch.Generator().manual_seed(5), dtype=F64)
    fisher = grads.T @ grads / n + 1e-3 * torch.eye(k, dtype=F64)
    scores, finv = structured_scores(grads, 1e-3)
    ones = torch.ones(k, dtype=F64)
    for prune in ([3], [1, 4, 7], torch.tensor([0, 11])):
        q = torch.as_tensor(prune)
        masks = structured_update(finv, prune)
        assert torch.all(masks[q] == 0)
        increase = quadratic_loss(masks, ones, fisher)
        predicted = 0.5 * torch.linalg.solve(finv[q][:, q], torch.ones(len(q), dtype=F64)).sum()
        assert increase == pytest.approx(float(predicted), rel=1e-8)
        if len(q) == 1:
            assert increase == pytest.approx(float(scores[q[0]]), rel=1e-8)
        pruned = torch.zeros(k, dtype=torch.bool)
        pruned[q] = True
        assert_constrained_minimum(masks, ones, fisher, pruned)
    assert torch.equal(structured_update(finv, []), ones)


# --- cubic schedule ----------------------------------------------------------------------------


def test_cubic_sparsity_endpoints_shape_and_clamping() -> None:
    assert cubic_sparsity(0, 100, 0.1, 0.9) == pytest.approx(0.1)
    assert cubic_sparsity(100, 100, 0.1, 0.9) == pytest.approx(0.9)
    assert cubic_sparsity(50, 100, 0.0, 0.8) == pytest.approx(0.8 - 0.8 / 8)
    values = [cubic_sparsity(t, 100, 0.0, 0.8, start=10, end=70) for t in range(0, 101)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert values[0] == values[10] == 0.0  # before start: initial
    assert values[70] == values[100] == pytest.approx(0.8)  # after end: final
    steps = [b - a for a, b in itertools.pairwise(values[10:71])]
    assert steps[0] > steps[-1]  # fast early, slow late
    assert cubic_sparsity(5, 10, 0.0, 0.5, start=5, end=5) == 0.5
    with pytest.raises(ValueError):
        cubic_sparsity(0, 10, 0.0, 0.5, start=8, end=4)
