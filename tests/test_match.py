"""Tests of fxmerge.match: the matchers, their merge / unmerge matrices, and zip against its reference."""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxmerge.errors import ConfigError
import fxmerge.match as fxmerge_match
from fxmerge.match import _checked_similarity, match
from fxmerge.match.clusters import labels_by_smallest_member, merge_matrices, unit_offsets
from fxmerge.match.groups import mean_matched_similarity, pair_blocks
from fxmerge.match.reference import naive_zip_matching
from fxmerge.match import zip as zip_module
from fxmerge.match.zip import IDENTICAL, ZipMatching, _best_entries, zip_budgets, zip_matching

# ----------------------------------------------------------------------------------------- helpers


def random_symmetric(rng: np.random.Generator, n_units: int, integer_values: bool = False) -> np.ndarray:
    """(n_units, n_units) symmetric matrix; integer_values gives many exact ties."""
    if integer_values:
        upper = rng.integers(-2, 3, size=(n_units, n_units)).astype(np.float64)
        return np.triu(upper) + np.triu(upper, 1).T
    raw = rng.normal(size=(n_units, n_units))
    return (raw + raw.T) / 2


def correlation_of(features: list[np.ndarray]) -> np.ndarray:
    """Correlation (N, N) of the units of several models; features[k] is (n_k, samples)."""
    similarity = np.corrcoef(np.concatenate(features))
    return (similarity + similarity.T) / 2


def zip_or_error(fn, similarity, sizes, target_width, alpha, beta) -> ZipMatching | str:
    try:
        return fn(similarity, sizes, target_width, alpha, beta)
    except ConfigError:
        return "unreachable"


def merge_bits(matching: ZipMatching) -> list[tuple[int, int, bytes]]:
    """The merges with each score as its float64 bytes: bit-identical, 0.0 and -0.0 told apart."""
    return [(kept, absorbed, np.float64(score).tobytes()) for kept, absorbed, score in matching.merges]


# zip_matching's merge loops, chosen by its module constants: the default (N <= ROW_BESTS_MAX_UNITS:
# row bests unless most best partners are mutual), the candidate runs alone, the row bests always,
# and the row bests handing over to the runs after their first merge, early, or when rescans average 3 rows per merge.
ZIP_PATHS = {
    "default": {},
    "runs": {"ROW_BESTS_MAX_UNITS": 0},
    "row bests": {"RUNS_MIN_MUTUAL_FRACTION": 2.0},
    "row bests, runs at once": {"RUNS_MIN_MUTUAL_FRACTION": 2.0, "ROW_BESTS_RESCANS_PER_MERGE": 0},
    "row bests, runs early": {"RUNS_MIN_MUTUAL_FRACTION": 2.0, "ROW_BESTS_RESCANS_PER_MERGE": 1},
    "row bests, runs when busy": {"RUNS_MIN_MUTUAL_FRACTION": 2.0, "ROW_BESTS_RESCANS_PER_MERGE": 3},
}


@contextlib.contextmanager
def zip_path(name: str):
    """zip_matching forced onto one of ZIP_PATHS (hypothesis tests cannot use the monkeypatch fixture)."""
    saved = {key: getattr(zip_module, key) for key in ZIP_PATHS[name]}
    try:
        for key, value in ZIP_PATHS[name].items():
            setattr(zip_module, key, value)
        yield
    finally:
        for key, value in saved.items():
            setattr(zip_module, key, value)


def assert_same_zip(similarity, sizes, target_width, alpha, beta, through_match: bool = False) -> None:
    """Every path of fast zip and naive zip make the same merges (or all fail); through_match also compares match()'s matrices."""
    naive = zip_or_error(naive_zip_matching, similarity, sizes, target_width, alpha, beta)
    for path in ZIP_PATHS:
        with zip_path(path):
            fast = zip_or_error(zip_matching, similarity, sizes, target_width, alpha, beta)
        context = f"{path}: sizes={sizes} r={target_width} alpha={alpha} beta={beta}"
        if isinstance(fast, str) or isinstance(naive, str):
            assert fast == naive, context
            continue
        assert merge_bits(fast) == merge_bits(naive), context
        np.testing.assert_array_equal(fast.labels, naive.labels, err_msg=context)
    if isinstance(naive, str):
        return
    if not through_match:
        return
    for (fast_merge, fast_unmerge), (naive_merge, naive_unmerge) in zip(
        match(similarity, sizes, target_width, method="zip", alpha=alpha, beta=beta),
        merge_matrices(naive.labels, sizes, target_width),
    ):
        np.testing.assert_array_equal(fast_merge, naive_merge)
        np.testing.assert_array_equal(fast_unmerge, naive_unmerge)


def assert_valid_matrices(matrices, sizes, target_width) -> None:
    """Shapes, one-hot unmerge rows, averaging merge rows and merge-after-unmerge = identity."""
    assert len(matrices) == len(sizes)
    cluster_sizes = sum(unmerge.sum(axis=0) for _, unmerge in matrices)
    assert np.all(cluster_sizes >= 1)
    identity = np.zeros((target_width, target_width))
    for (merge, unmerge), n_k in zip(matrices, sizes):
        assert merge.shape == (target_width, n_k) and unmerge.shape == (n_k, target_width)
        assert merge.dtype == np.float64 and unmerge.dtype == np.float64
        assert set(np.unique(unmerge)) <= {0.0, 1.0}
        np.testing.assert_array_equal(unmerge.sum(axis=1), np.ones(n_k))
        np.testing.assert_array_equal(merge, unmerge.T / cluster_sizes[:, None])
        identity += merge @ unmerge
    np.testing.assert_allclose(identity, np.eye(target_width), atol=1e-12)


def labels_from(matrices) -> np.ndarray:
    """(N,) cluster of every global unit, read back from the unmerge matrices."""
    return np.concatenate([unmerge.argmax(axis=1) for _, unmerge in matrices])


# ------------------------------------------------------------------------------- zip vs reference


@pytest.mark.parametrize("sizes", [(5, 9), (16, 16), (7, 11, 13), (4, 4, 4), (1, 3), (9, 5)])
@pytest.mark.parametrize("integer_values", [False, True])
def test_fast_zip_equals_naive_reference_for_every_width(sizes, integer_values):
    rng = np.random.default_rng(sum(sizes) + integer_values)
    n_units = sum(sizes)
    similarity = random_symmetric(rng, n_units, integer_values)
    for alpha, beta in itertools.product([0.0, 0.3, 0.5, 1.0], [0.0, 0.5, 1.0, 2.0]):
        for target_width in range(1, n_units):
            assert_same_zip(similarity, list(sizes), target_width, alpha, beta)


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=2, max_size=4),
    seed=st.integers(0, 2**32 - 1),
    integer_values=st.booleans(),
    width_fraction=st.floats(0.0, 1.0),
    alpha=st.sampled_from([0.0, 0.25, 0.3, 0.5, 0.9, 1.0, 1.5]),
    beta=st.sampled_from([0.0, 0.3, 0.5, 1.0, 2.0, 5.0]),
)
def test_fast_zip_equals_naive_reference_hypothesis(sizes, seed, integer_values, width_fraction, alpha, beta):
    n_units = sum(sizes)
    similarity = random_symmetric(np.random.default_rng(seed), n_units, integer_values)
    target_width = 1 + int(width_fraction * (n_units - 1))
    assert_same_zip(similarity, sizes, target_width, alpha, beta, through_match=True)


def test_fast_zip_equals_naive_reference_on_all_equal_scores():
    # Every pair ties: the order is decided by the (rep_lo, rep_hi) tie-break alone.
    for sizes in [(4, 4), (3, 6, 2)]:
        similarity = np.full((sum(sizes),) * 2, 0.25)
        for target_width in range(1, sum(sizes)):
            assert_same_zip(similarity, list(sizes), target_width, 0.5, 1.0)


def test_fast_zip_equals_naive_reference_when_decayed_scores_rise():
    # All scores negative: alpha * min(negative) is larger than the scores it replaces, so a merged
    # cluster becomes many rows' new best (the row bests' in-place update, not a rescan, must catch it).
    rng = np.random.default_rng(3)
    for sizes in [(20, 20), (7, 19, 11)]:
        similarity = -np.abs(random_symmetric(rng, sum(sizes))) - 0.1
        for target_width, alpha, beta in [(max(sizes), 0.5, 1.0), (sum(sizes) // 4, 0.5, 0.0), (5, 0.9, 3.0)]:
            assert_same_zip(similarity, list(sizes), target_width, alpha, beta)


def test_fast_zip_equals_naive_reference_on_a_larger_correlation_matrix():
    rng = np.random.default_rng(7)
    features = rng.normal(size=(300, 64))
    similarity = correlation_of([features[:140], features[140:]])
    for target_width in (150, 200, 299):
        assert_same_zip(similarity, [140, 160], target_width, 0.5, 1.0)


# Values around the no-decay threshold and both signs of zero: alpha = 0 and ties everywhere.
TIE_HEAVY_VALUES = [-1.0, -0.5, -0.0, 0.0, 0.25, 0.5, IDENTICAL - 1e-9, IDENTICAL, 1.0]


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=4),
    data=st.data(),
    width_fraction=st.floats(0.0, 1.0),
    alpha=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    beta=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
)
def test_fast_zip_equals_naive_reference_on_tie_heavy_matrices(sizes, data, width_fraction, alpha, beta):
    n_units = sum(sizes)
    upper = data.draw(
        st.lists(st.sampled_from(TIE_HEAVY_VALUES), min_size=n_units * n_units, max_size=n_units * n_units)
    )
    upper = np.array(upper).reshape(n_units, n_units)
    similarity = np.triu(upper) + np.triu(upper, 1).T
    target_width = 1 + int(width_fraction * (n_units - 1))
    assert_same_zip(similarity, sizes, target_width, alpha, beta, through_match=True)


@pytest.mark.parametrize("block_entries", [1, 40, 100])
def test_fast_zip_equals_naive_reference_with_tiny_row_blocks(monkeypatch, block_entries):
    # The initial runs are found by row blocks of ROW_BLOCK_ENTRIES // N rows: 1 row, a few rows, and
    # blocks that do not divide N; match's symmetry tiles of 7 do not divide it either.
    monkeypatch.setattr(zip_module, "ROW_BLOCK_ENTRIES", block_entries)
    monkeypatch.setattr(fxmerge_match, "_SYMMETRY_TILE", 7)
    for seed, (sizes, integer_values) in enumerate(itertools.product([(9, 14), (8, 8, 7), (20, 3)], [False, True])):
        similarity = random_symmetric(np.random.default_rng(seed), sum(sizes), integer_values)
        for target_width, alpha, beta in [(max(sizes), 0.5, 1.0), (sum(sizes) // 3, 0.0, 2.0), (max(sizes), 1.0, 0.0)]:
            assert_same_zip(similarity, list(sizes), target_width, alpha, beta, through_match=True)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.sampled_from([-np.inf, -1.0, 0.0, 0.5, 2.0, np.inf]) | st.floats(-3, 3), max_size=120),
    count=st.integers(1, 40),
)
def test_best_entries_equals_sorting(values, count):
    values = np.array(values, dtype=np.float64)
    chosen, threshold = _best_entries(values, count)
    candidates = [index for index in range(len(values)) if values[index] > -np.inf]
    ranked = sorted(candidates, key=lambda index: (-values[index], index))
    if len(ranked) <= count:
        expected, expected_threshold = ranked, -np.inf
    else:
        expected_threshold = values[ranked[count - 1]]
        expected = [index for index in ranked if values[index] >= expected_threshold]
    assert chosen.tolist() == expected
    # -inf means every candidate was taken; a finite threshold that leaves nothing unsorted is allowed.
    assert threshold == expected_threshold or (threshold == values[expected[-1]] and len(expected) == len(ranked))


def test_zip_tie_break_takes_the_smallest_pair():
    # Pairs (0, 2) and (1, 3) both score 1; (0, 2) is lexicographically smaller and goes first.
    similarity = np.array(
        [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]
    )
    result = zip_matching(similarity, [2, 2], 2, 0.5, 1.0)
    assert result.merges == ((0, 2, 1.0), (1, 3, 1.0))
    np.testing.assert_array_equal(result.labels, [0, 1, 0, 1])


def test_zip_merged_clusters_merge_again_with_decayed_scores():
    # Three near-copies: after (0, 2) merges, the cluster's score with unit 4 is 0.5 * min(0.9, 0.8).
    similarity = np.eye(6)
    for a, b, value in [(0, 2, 0.95), (0, 4, 0.9), (2, 4, 0.8), (1, 3, 0.3), (3, 5, 0.2), (1, 5, 0.1)]:
        similarity[a, b] = similarity[b, a] = value
    result = zip_matching(similarity, [2, 2, 2], 3, 0.5, 1.0)
    assert result.merges[0] == (0, 2, 0.95)
    assert result.merges[1] == (0, 4, 0.5 * 0.8)
    np.testing.assert_array_equal(result.labels, [0, 1, 0, 1, 0, 2])


def test_zip_budget_stops_within_model_merges():
    # Model 0's units are each other's best match, but beta=0 forbids within-model merges.
    similarity = np.array(
        [[1.0, 0.9, 0.1, 0.2], [0.9, 1.0, 0.3, 0.1], [0.1, 0.3, 1.0, 0.95], [0.2, 0.1, 0.95, 1.0]]
    )
    cross_only = zip_matching(similarity, [2, 2], 2, 0.5, 0.0)
    assert [(kept, absorbed) for kept, absorbed, _ in cross_only.merges] == [(1, 2), (0, 3)]
    with_budget = zip_matching(similarity, [2, 2], 2, 0.5, 1.0)
    assert [(kept, absorbed) for kept, absorbed, _ in with_budget.merges] == [(2, 3), (0, 1)]


def test_zip_budgets_follow_the_unit_shares():
    assert zip_budgets([16, 16], 16, 1.0) == [8, 8]
    assert zip_budgets([16, 16], 16, 0.5) == [4, 4]
    assert zip_budgets([5, 9], 7, 1.0) == [int(7 * 5 / 14), int(7 * 9 / 14)]
    assert zip_budgets([10, 10], 10, 0.0) == [0, 0]
    # With equal sizes and to_remove divisible by K, ZipIt's (to_remove // K) * beta.
    for beta in (0.5, 1.0, 2.0):
        assert zip_budgets([8, 8, 8], 12, beta) == [int((12 // 3) * beta)] * 3


def test_zip_unreachable_width_raises_in_both_implementations():
    # beta=0: a cluster holds at most one unit per model, so fewer clusters than the widest model is impossible.
    similarity = random_symmetric(np.random.default_rng(0), 14)
    for fn in (zip_matching, naive_zip_matching):
        with pytest.raises(ConfigError, match="target_width=8"):
            fn(similarity, [5, 9], 8, 0.5, 0.0)
    with pytest.raises(ConfigError, match="cannot reach"):
        match(similarity, [5, 9], 8, method="zip", beta=0.0)
    assert zip_matching(similarity, [5, 9], 9, 0.5, 0.0).labels.max() == 8


def test_zip_target_width_extremes():
    similarity = random_symmetric(np.random.default_rng(1), 10)
    no_merge = match(similarity, [4, 6], 10, method="zip")
    np.testing.assert_array_equal(labels_from(no_merge), np.arange(10))
    one_cluster = match(similarity, [4, 6], 1, method="zip", beta=10.0)
    np.testing.assert_array_equal(labels_from(one_cluster), np.zeros(10))


# ------------------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 10), min_size=2, max_size=3),
    seed=st.integers(0, 2**32 - 1),
    width_fraction=st.floats(0.0, 1.0),
)
def test_zip_matrices_are_valid_and_clusters_ordered_by_smallest_unit(sizes, seed, width_fraction):
    n_units = sum(sizes)
    similarity = random_symmetric(np.random.default_rng(seed), n_units)
    target_width = 1 + int(width_fraction * (n_units - 1))
    try:
        matrices = match(similarity, sizes, target_width, method="zip", beta=1.0)
    except ConfigError:
        return
    assert_valid_matrices(matrices, sizes, target_width)
    labels = labels_from(matrices)
    np.testing.assert_array_equal(labels, labels_by_smallest_member(labels))


@pytest.mark.parametrize("sizes", [(6, 6), (3, 8), (8, 3, 5), (5, 5, 5)])
def test_permute_and_average_matrices_are_valid(sizes):
    similarity = random_symmetric(np.random.default_rng(2), sum(sizes))
    assert_valid_matrices(match(similarity, sizes, max(sizes), method="permute"), sizes, max(sizes))
    if len(set(sizes)) == 1:
        assert_valid_matrices(match(similarity, sizes, sizes[0], method="average"), sizes, sizes[0])


def test_average_is_identity_over_model_count():
    similarity = random_symmetric(np.random.default_rng(3), 12)
    for merge, unmerge in match(similarity, [4, 4, 4], 4, method="average"):
        np.testing.assert_array_equal(merge, np.eye(4) / 3)
        np.testing.assert_array_equal(unmerge, np.eye(4))
    for merge, unmerge in match(similarity, [4, 4, 4], 4, method="average", groups=2):
        np.testing.assert_array_equal(unmerge, np.eye(4))


def test_labels_by_smallest_member_orders_clusters():
    np.testing.assert_array_equal(labels_by_smallest_member(np.array([7, 3, 7, 9, 3])), [0, 1, 0, 2, 1])


# --------------------------------------------------------------------------------------- recovery


def permuted_copy_similarity(rng, n_units, samples=200):
    """Similarity of model 0's features and model 1 = a permuted copy; returns (similarity, f0, f1, perm)."""
    features = rng.normal(size=(n_units, samples))
    permutation = rng.permutation(n_units)
    copy = features[permutation]  # model 1's unit j is model 0's unit permutation[j]
    return correlation_of([features, copy]), features, copy, permutation


@pytest.mark.parametrize("method", ["permute", "zip"])
def test_matchers_pair_each_unit_with_its_copy(method):
    rng = np.random.default_rng(4)
    similarity, features, copy, _ = permuted_copy_similarity(rng, 24)
    (merge_0, _), (merge_1, _) = match(similarity, [24, 24], 24, method=method)
    np.testing.assert_allclose(merge_0 @ features + merge_1 @ copy, features, atol=1e-12)


def test_permute_leaves_the_wider_models_extra_units_alone():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(10, 200))
    kept_units = rng.permutation(10)[:6]
    narrow = features[kept_units]
    similarity = correlation_of([narrow, features])  # the wider model (reference) comes second
    (merge_narrow, unmerge_narrow), (merge_wide, unmerge_wide) = match(similarity, [6, 10], 10, method="permute")
    np.testing.assert_array_equal(unmerge_wide, np.eye(10))  # clusters in reference unit order
    np.testing.assert_array_equal(unmerge_narrow.argmax(axis=1), kept_units)
    unmatched = np.setdiff1d(np.arange(10), kept_units)
    np.testing.assert_array_equal(merge_wide[unmatched, unmatched], np.ones(len(unmatched)))
    np.testing.assert_allclose(merge_narrow @ narrow + merge_wide @ features, features, atol=1e-12)


def brute_force_assignment(cross: np.ndarray) -> np.ndarray:
    """For cross (n_ref, n_k), n_k <= n_ref: the reference unit of each model unit maximising the total."""
    n_reference, n_model = cross.shape
    best = max(
        itertools.permutations(range(n_reference), n_model),
        key=lambda chosen: cross[list(chosen), range(n_model)].sum(),
    )
    return np.array(best)


@pytest.mark.parametrize("sizes", [(4, 4), (3, 5), (5, 3), (4, 2, 5), (5, 5, 3)])
def test_permute_equals_brute_force(sizes):
    rng = np.random.default_rng(sum(sizes))
    similarity = random_symmetric(rng, sum(sizes))
    offsets = unit_offsets(sizes)
    reference = int(np.argmax(sizes))
    labels = labels_from(match(similarity, sizes, max(sizes), method="permute"))
    for k in range(len(sizes)):
        units = slice(offsets[k], offsets[k + 1])
        if k == reference:
            np.testing.assert_array_equal(labels[units], np.arange(sizes[k]))
            continue
        cross = similarity[offsets[reference] : offsets[reference + 1], units]
        np.testing.assert_array_equal(labels[units], brute_force_assignment(cross))


# ----------------------------------------------------------------------------------------- groups


def block_permuted_copy(rng, groups, block, samples=300):
    """Model 1 = model 0 with its blocks permuted and the units permuted inside every block.

    Returns (similarity, features, copy, block_permutation): model 1's block q is model 0's block
    block_permutation[q].
    """
    features = rng.normal(size=(groups * block, samples))
    block_permutation = rng.permutation(groups)
    copy_units = np.concatenate([b * block + rng.permutation(block) for b in block_permutation])
    copy = features[copy_units]
    return correlation_of([features, copy]), features, copy, block_permutation


@pytest.mark.parametrize("method", ["permute", "zip"])
def test_groups_pair_blocks_and_match_inside_them(method):
    rng = np.random.default_rng(6)
    groups, block = 4, 5
    similarity, features, copy, block_permutation = block_permuted_copy(rng, groups, block)
    pairing = pair_blocks(similarity, [20, 20], groups, reference=0)
    np.testing.assert_array_equal(pairing[1, block_permutation], np.arange(groups))
    matrices = match(similarity, [20, 20], 20, method=method, groups=groups)
    assert_valid_matrices(matrices, [20, 20], 20)
    (merge_0, _), (merge_1, _) = matrices
    np.testing.assert_allclose(merge_0 @ features + merge_1 @ copy, features, atol=1e-12)


def test_groups_restrict_matches_to_paired_blocks():
    # Model 0's blocks: {f0, f1}, {f2, f3}.  Model 1's blocks: {f0, u}, {f2, v} with u mostly f3 and v
    # mostly f1.  Globally u goes to f3 and v to f1 (across blocks); with groups=2 the blocks pair
    # ({f0, u} with {f0, f1} scores (1 + 0.6) / 2) and u must take f1, v f3.
    rng = np.random.default_rng(8)
    features = np.linalg.qr(rng.normal(size=(400, 4)))[0].T  # 4 exactly uncorrelated-ish signals
    features -= features.mean(axis=1, keepdims=True)
    u = 0.6 * features[1] + 0.8 * features[3]
    v = 0.8 * features[1] + 0.6 * features[3]
    copy = np.stack([features[0], u, features[2], v])
    similarity = correlation_of([features, copy])
    unrestricted = labels_from(match(similarity, [4, 4], 4, method="permute"))
    np.testing.assert_array_equal(unrestricted[4:], [0, 3, 2, 1])
    np.testing.assert_array_equal(pair_blocks(similarity, [4, 4], 2, reference=0)[1], [0, 1])
    for method in ("permute", "zip"):
        grouped = labels_from(match(similarity, [4, 4], 4, method=method, groups=2))
        np.testing.assert_array_equal(grouped, [0, 1, 2, 3, 0, 1, 2, 3])


def test_grouped_zip_can_shrink_every_block():
    rng = np.random.default_rng(9)
    similarity, _, _, _ = block_permuted_copy(rng, 3, 4)
    matrices = match(similarity, [12, 12], 9, method="zip", groups=3)
    assert_valid_matrices(matrices, [12, 12], 9)
    labels = labels_from(matrices)
    pairing = pair_blocks(similarity, [12, 12], 3, reference=0)
    for output_block in range(3):
        for k in range(2):
            start = 12 * k + 4 * pairing[k, output_block]
            assert set(labels[start : start + 4] // 3) == {output_block}


def test_mean_matched_similarity():
    cross = np.array([[0.9, 0.1, 0.0], [0.2, 0.1, 0.7]])
    assert mean_matched_similarity(cross) == pytest.approx((0.9 + 0.7) / 2)


# ---------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sizes": [6]}, "at least 2 models"),
        ({"sizes": [3, 0, 3]}, "size 0"),
        ({"sizes": [3, 2.5]}, "2.5"),
        ({"target_width": 0}, "target_width"),
        ({"target_width": 13}, "13"),
        ({"target_width": 3.0}, "3.0"),
        ({"method": "magic"}, "magic"),
        ({"alpha": -0.5}, "alpha"),
        ({"beta": float("nan")}, "beta"),
        ({"groups": 0}, "groups"),
        ({"groups": 4}, "groups=4"),
        ({"groups": 2, "target_width": 5}, "target_width=5"),
        ({"method": "permute", "target_width": 5}, "target_width=5"),
        ({"method": "average", "target_width": 5}, "target_width=5"),
        ({"method": "average", "sizes": [4, 8], "target_width": 8}, "equal width"),
        ({"method": "permute", "groups": 3, "target_width": 3}, "target_width=3"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, message):
    arguments = {"sizes": [6, 6], "target_width": 6, "method": "zip"}
    arguments.update(kwargs)
    similarity = random_symmetric(np.random.default_rng(0), int(sum(arguments["sizes"])))
    with pytest.raises(ConfigError, match=message):
        match(similarity, **arguments)


def test_bad_similarity_raises_config_error():
    good = random_symmetric(np.random.default_rng(0), 6)
    with pytest.raises(ConfigError, match=r"shape \(5, 5\)"):
        match(good[:5, :5], [3, 3], 3, method="zip")
    not_finite = good.copy()
    not_finite[1, 2] = not_finite[2, 1] = np.nan
    with pytest.raises(ConfigError, match="finite"):
        match(not_finite, [3, 3], 3, method="zip")
    asymmetric = good.copy()
    asymmetric[0, 1] += 0.5
    with pytest.raises(ConfigError, match="symmetric"):
        match(asymmetric, [3, 3], 3, method="zip")
    # Last-bit asymmetry from floating point is tolerated.
    nearly = good.copy()
    nearly[0, 1] += 1e-15
    assert len(match(nearly, [3, 3], 3, method="zip")) == 2


def perturbed_symmetric(seed: int, n_units: int) -> np.ndarray:
    """A symmetric matrix plus asymmetric noise straddling match's symmetry tolerance (rtol 1e-6, atol 1e-9)."""
    rng = np.random.default_rng(seed)
    similarity = random_symmetric(rng, n_units) * 10.0 ** rng.integers(-4, 3)
    scale = rng.choice([0.0, 1e-10, 1e-9, 2e-9, 1e-7, 1e-6, 1e-5]) * (1.0 + np.abs(similarity))
    return similarity + scale * rng.uniform(-1.0, 1.0, size=(n_units, n_units))


@pytest.mark.parametrize("n_units", [5, 128, 300])
def test_symmetry_check_agrees_with_allclose_and_averages_exactly(n_units):
    # 300 units: several tiles of the blockwise check, the last one partial.
    outcomes = set()
    for seed in range(12):
        similarity = perturbed_symmetric(seed, n_units)
        symmetric_enough = np.allclose(similarity, similarity.T, rtol=1e-6, atol=1e-9)
        outcomes.add(symmetric_enough)
        try:
            checked = _checked_similarity(similarity, n_units)
        except ConfigError as error:
            assert not symmetric_enough and "symmetric" in str(error), seed
            continue
        assert symmetric_enough, seed
        np.testing.assert_array_equal(checked, (similarity + similarity.T) / 2.0)
        # a new array with contiguous rows, which zip may use as its scores (rows apart: padded_square)
        assert checked.strides[1] == checked.itemsize and checked is not similarity
        for other_layout in (np.asfortranarray(similarity), similarity.astype(np.float32)):
            converted = np.asarray(other_layout, dtype=np.float64)
            np.testing.assert_array_equal(_checked_similarity(other_layout, n_units), (converted + converted.T) / 2.0)
    assert outcomes == {True, False}  # the seeds cover both sides of the tolerance


def test_symmetry_check_tolerance_is_relative_to_both_entries():
    # allclose(S, S.T) bounds |a - b| by atol + rtol * |b| at (i, j) and by atol + rtol * |a| at (j, i):
    # a difference between the two bounds passes one order only and must be rejected.
    similarity = np.eye(300)
    a = 1000.0
    for difference, accepted in [(1e-9 + 1e-6 * a - 0.5e-9, True), (1e-9 + 1e-6 * a + 0.5e-9, False)]:
        similarity[10, 250], similarity[250, 10] = a, a + difference
        assert np.allclose(similarity, similarity.T, rtol=1e-6, atol=1e-9) == accepted
        assert np.allclose(similarity[10, 250], similarity[250, 10], rtol=1e-6, atol=1e-9)  # one order passes
        if accepted:
            assert _checked_similarity(similarity, 300)[250, 10] == (a + (a + difference)) / 2
        else:
            with pytest.raises(ConfigError, match=r"symmetric; entries \((10, 250|250, 10)\)"):
                _checked_similarity(similarity, 300)


def test_non_finite_similarity_is_reported_before_asymmetry():
    similarity = random_symmetric(np.random.default_rng(11), 300)
    similarity[3, 5] += 1.0  # asymmetric in the first tile
    similarity[290, 7] = np.inf  # not finite, in a later tile
    with pytest.raises(ConfigError, match=r"finite; entry \(290, 7\) is inf"):
        match(similarity, [150, 150], 150, method="zip")
    similarity[290, 7] = similarity[7, 290] = np.nan
    with pytest.raises(ConfigError, match=r"finite; entry \(7, 290\) is nan"):
        match(similarity, [150, 150], 150, method="zip")


def test_match_leaves_the_callers_similarity_alone():
    # match hands zip its own symmetrised copy to overwrite, never the caller's array.
    similarity = random_symmetric(np.random.default_rng(3), 40)
    similarity[0, 1] += 1e-15
    before = similarity.copy()
    for groups in (None, 2):
        match(similarity, [20, 20], 16, method="zip", groups=groups)
        np.testing.assert_array_equal(similarity, before)


@pytest.mark.parametrize("method", ["zip", "permute"])
def test_a_workspace_holds_the_working_copy_and_gives_the_same_labels(method):
    rng = np.random.default_rng(4)
    similarity = random_symmetric(rng, 40)
    similarity[0, 1] += 1e-15  # the working copy is the symmetrised similarity
    before = similarity.copy()
    expected = fxmerge_match.match_labels(similarity, [20, 20], 24 if method == "zip" else 20, method=method)
    workspace = np.full(45 * 45, 7.0)  # larger than needed: one buffer serves many groups
    got = fxmerge_match.match_labels(
        similarity, [20, 20], 24 if method == "zip" else 20, method=method, workspace=workspace
    )
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(similarity, before)  # the caller's similarity is still left alone
    used = workspace[: 40 * 40].reshape(40, 40)
    if method == "permute":  # the symmetrised copy, as it was handed to the matcher
        np.testing.assert_array_equal(used, (before + before.T) / 2)
    else:  # zip overwrote it with its scores
        assert not np.array_equal(used, (before + before.T) / 2)
    assert np.all(workspace[40 * 40 :] == 7.0)


def test_a_workspace_that_cannot_serve_is_refused():
    similarity = random_symmetric(np.random.default_rng(5), 10)
    for bad in (np.empty(99), np.empty(100, dtype=np.float32), np.empty((10, 10), order="F"), [0.0] * 100):
        with pytest.raises(ConfigError, match="workspace must be a writeable C-contiguous float64 numpy array of at least 100"):
            fxmerge_match.match_labels(similarity, [5, 5], 5, method="zip", workspace=bad)
    shared = np.empty(100)
    shared_similarity = shared.reshape(10, 10)
    shared_similarity[:] = similarity
    with pytest.raises(ConfigError, match="must not share memory with the similarity"):
        fxmerge_match.match_labels(shared_similarity, [5, 5], 5, method="zip", workspace=shared)


def test_score_rows_padded_to_an_odd_number_of_cache_lines_give_the_same_merges():
    from fxmerge.match.clusters import padded_square, square_row_length

    assert [square_row_length(n) for n in (40, 128, 1536, 1537)] == [40, 136, 1544, 1544]
    similarity = random_symmetric(np.random.default_rng(6), 128)
    padded = padded_square(128)
    padded[...] = similarity
    assert padded.strides == (136 * 8, 8)
    contiguous = zip_matching(similarity.copy(), [64, 64], 80, 0.5, 1.0, overwrite_similarity=True)
    in_place = zip_matching(padded, [64, 64], 80, 0.5, 1.0, overwrite_similarity=True)
    assert np.isneginf(np.diagonal(padded)).all()  # the padded view itself became the scores
    np.testing.assert_array_equal(in_place.labels, contiguous.labels)
    assert in_place.merges == contiguous.merges == naive_zip_matching(similarity, [64, 64], 80, 0.5, 1.0).merges
