"""The tie-aware comparison the suite uses for rankings computed in other processes: it accepts a
flipped near-tie and refuses a real disagreement."""

from __future__ import annotations

import pytest
from helpers import assert_same_ranking


def test_equal_rankings_and_flipped_ties_pass() -> None:
    assert_same_ranking([1, 2, 3], [0.9, 0.5, 0.1], [1, 2, 3], [0.9, 0.5, 0.1])
    # 2 and 3 tie (within 1e-6): either order is right.
    assert_same_ranking([1, 3, 2], [0.9, 0.5000004, 0.5], [1, 2, 3], [0.9, 0.5000003, 0.5000001])
    # A candidate that ties with the last one may take its place.
    assert_same_ranking([1, 2, 7], [0.9, 0.5, 0.1000001], [1, 2, 3], [0.9, 0.5, 0.1])


@pytest.mark.parametrize("got_ids, got_scores", [
    ([2, 1, 3], [0.9, 0.5, 0.1]),        # a real swap: 2 scored 0.5, not 0.9
    ([1, 7, 3], [0.9, 0.5, 0.1]),        # 7 took 2's place but 2 (0.5) beats the last hit (0.1)
    ([1, 2, 3], [0.9, 0.5, 0.2]),        # another score
    ([1, 2], [0.9, 0.5]),                # another length
    ([1, 1, 3], [0.9, 0.5, 0.1]),        # a repeated id
])
def test_real_disagreements_fail(got_ids, got_scores) -> None:
    with pytest.raises(AssertionError):
        assert_same_ranking(got_ids, got_scores, [1, 2, 3], [0.9, 0.5, 0.1])
