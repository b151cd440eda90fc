"""The depth-alignment dynamic program against exhaustive enumeration of all segmentations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxmerge.errors import ConfigError, IncompatibleModelsError
from fxmerge.passes.segmentation import Segmentation, segment


def brute_force(cka, objective, first_ok, extra_ok):
    """All valid segmentations by enumeration: returns (best value, lexicographically smallest
    optimal boundaries, sorted list of all values), or None when none is valid."""
    m, n = cka.shape
    scored = []
    for inner in itertools.combinations(range(1, m), n - 1):
        bounds = (*inner, m)
        starts = (0, *inner)
        ok = True
        value = 0.0
        for i in range(n):
            s, e = starts[i], bounds[i]
            if not first_ok[s, i] or not all(extra_ok[j] for j in range(s + 1, e)):
                ok = False
                break
            if objective == "sma":
                value += cka[e - 1, i]
            else:
                value += sum(cka[j, i] for j in range(s, e))
        if ok:
            scored.append((value, bounds))
    if not scored:
        return None
    best = max(v for v, _ in scored)
    best_bounds = min(b for v, b in scored if v == best)
    return best, best_bounds, sorted(v for v, _ in scored)


def check_against_brute_force(cka, objective, first_ok, extra_ok, exact_ties):
    expected = brute_force(cka, objective, first_ok, extra_ok)
    if expected is None:
        with pytest.raises(IncompatibleModelsError):
            segment(cka, objective, first_ok, extra_ok)
        return
    best, best_bounds, values = expected
    result = segment(cka, objective, first_ok, extra_ok)
    assert math.isclose(result.value, best, rel_tol=1e-12, abs_tol=1e-12)
    assert result.objective == objective
    # The reported value is the objective of the returned boundaries.
    starts = (0, *result.boundaries[:-1])
    assert result.boundaries[-1] == cka.shape[0]
    assert result.first_units == starts
    assert result.segments == tuple(tuple(range(s, e)) for s, e in zip(starts, result.boundaries))
    # Integer matrices sum exactly, so ties are exact and the boundaries must match; with random
    # floats they must match whenever the optimum is clearly unique.
    clearly_unique = sum(1 for v in values if v >= best - 1e-9) == 1
    if exact_ties or clearly_unique:
        assert result.boundaries == best_bounds


def random_problem(rng, m, n, integer, constrained):
    if integer:
        cka = rng.integers(-2, 3, size=(m, n)).astype(float)
    else:
        cka = rng.random((m, n))
    if constrained:
        first_ok = rng.random((m, n)) < 0.7
        extra_ok = rng.random(m) < 0.7
    else:
        first_ok = np.ones((m, n), dtype=bool)
        extra_ok = np.ones(m, dtype=bool)
    return cka, first_ok, extra_ok


@pytest.mark.parametrize("objective", ["lma", "sma"])
@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("integer", [False, True])
def test_matches_brute_force_on_random_problems(objective, constrained, integer):
    rng = np.random.default_rng(1234 + 2 * constrained + integer)
    infeasible = 0
    for _ in range(100):
        m = int(rng.integers(1, 9))
        n = int(rng.integers(1, m + 1))
        cka, first_ok, extra_ok = random_problem(rng, m, n, integer, constrained)
        if brute_force(cka, objective, first_ok, extra_ok) is None:
            infeasible += 1
        check_against_brute_force(cka, objective, first_ok, extra_ok, exact_ties=integer)
    if constrained:
        assert infeasible > 0  # the constrained cases do exercise the error path


@settings(max_examples=120, deadline=None)
@given(
    data=st.data(),
    m=st.integers(1, 8),
    objective=st.sampled_from(["lma", "sma"]),
)
def test_matches_brute_force_hypothesis(data, m, objective):
    n = data.draw(st.integers(1, m))
    values = data.draw(st.lists(st.integers(-3, 3), min_size=m * n, max_size=m * n))
    first = data.draw(st.lists(st.booleans(), min_size=m * n, max_size=m * n))
    extra = data.draw(st.lists(st.booleans(), min_size=m, max_size=m))
    cka = np.array(values, dtype=float).reshape(m, n)
    check_against_brute_force(cka, objective, np.array(first).reshape(m, n), np.array(extra), exact_ties=True)


def test_ties_choose_lexicographically_smallest_boundaries():
    # All-zero similarity: every segmentation is optimal, so earlier segments stay as short as possible.
    result = segment(np.zeros((6, 3)), "lma")
    assert result.boundaries == (1, 2, 6)
    assert result.segments == ((0,), (1,), (2, 3, 4, 5))
    assert result.first_units == (0, 1, 2)


@pytest.mark.parametrize("objective", ["lma", "sma"])
def test_equal_depth_gives_identity_segmentation(objective):
    rng = np.random.default_rng(0)
    result = segment(rng.random((5, 5)), objective)
    assert result.boundaries == (1, 2, 3, 4, 5)
    assert result.segments == ((0,), (1,), (2,), (3,), (4,))
    assert result.first_units == (0, 1, 2, 3, 4)


def test_single_shallow_unit_takes_everything():
    cka = np.array([[0.1], [0.9], [0.3]])
    assert segment(cka, "sma").value == pytest.approx(0.3)
    assert segment(cka, "lma").value == pytest.approx(1.3)
    assert segment(cka, "lma").segments == ((0, 1, 2),)


def test_objectives_differ_as_defined():
    # B unit 0 matches A unit 1 best, B unit 1 matches A unit 2 best. SMA scores the last unit of
    # each segment, so it ends segment 0 at A unit 1; LMA sums whole segments.
    cka = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.2]])
    sma = segment(cka, "sma")
    assert sma.boundaries == (2, 4)
    assert sma.value == pytest.approx(1.2)
    lma = segment(cka, "lma")
    assert lma.boundaries == (2, 4)
    assert lma.value == pytest.approx(2.2)
    assert isinstance(sma, Segmentation)


def test_result_is_frozen():
    result = segment(np.ones((3, 2)))
    with pytest.raises(AttributeError):
        result.value = 0.0  # type: ignore[misc]


def test_bad_objective_is_config_error():
    with pytest.raises(ConfigError, match="objective"):
        segment(np.ones((3, 2)), "max")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cka": np.ones((2, 3))},  # fewer deep than shallow units
        {"cka": np.ones((3, 0))},
        {"cka": np.ones(3)},
        {"cka": np.array([[np.nan], [1.0]])},
        {"cka": np.ones((3, 2)), "first_ok": np.ones((2, 3), dtype=bool)},
        {"cka": np.ones((3, 2)), "extra_ok": np.ones(2, dtype=bool)},
        {"cka": np.ones((3, 2)), "deep_names": ["a"]},
        {"cka": np.ones((3, 2)), "shallow_names": ["a", "b", "c"]},
    ],
)
def test_malformed_arguments_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        segment(**kwargs)


def test_infeasible_names_the_unit_without_a_compatible_start():
    first_ok = np.ones((5, 3), dtype=bool)
    first_ok[:, 2] = False  # nothing in the deep model looks like B unit 2
    with pytest.raises(IncompatibleModelsError, match="'stage2.0'"):
        segment(
            np.ones((5, 3)),
            "lma",
            first_ok,
            deep_names=[f"a{j}" for j in range(5)],
            shallow_names=["stage0.0", "stage1.0", "stage2.0"],
        )


def test_infeasible_names_the_unreachable_unit():
    # B unit 1 may only start at A unit 3, but A unit 2 cannot be an identity extra, so segment 0
    # (starting at A unit 0) cannot reach it.
    first_ok = np.zeros((5, 3), dtype=bool)
    first_ok[0, 0] = True
    first_ok[3, 1] = True
    first_ok[4, 2] = True
    extra_ok = np.array([True, True, False, True, True])
    with pytest.raises(IncompatibleModelsError, match="'down1'") as info:
        segment(
            np.ones((5, 3)),
            "sma",
            first_ok,
            extra_ok,
            deep_names=[f"a{j}" for j in range(5)],
            shallow_names=["stem", "down1", "head"],
        )
    assert "cannot be reached" in str(info.value)


def test_infeasible_when_the_tail_cannot_be_covered():
    # The last A unit is not shape-preserving and cannot start the last segment either.
    first_ok = np.ones((4, 2), dtype=bool)
    first_ok[3, 1] = False
    extra_ok = np.array([True, True, True, False])
    with pytest.raises(IncompatibleModelsError, match="'head'.*'a3'"):
        segment(
            np.ones((4, 2)),
            "lma",
            first_ok,
            extra_ok,
            deep_names=[f"a{j}" for j in range(4)],
            shallow_names=["body", "head"],
        )


def test_large_problem_is_fast():
    rng = np.random.default_rng(3)
    result = segment(rng.random((120, 40)), "lma")
    assert len(result.boundaries) == 40
    assert result.boundaries[-1] == 120
