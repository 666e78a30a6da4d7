"""Search strategies: names and files, the gate, the re-ranking, the note on a short class answer, and
the calibration's sweep, folds and recommendation rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluation import RERANK_BETAS, EvalConfig, calibration_folds, gain_bounds, recommend, strategy_grid
from pipeline.index import Hit
from pipeline.manifests import Recommendation
from pipeline.strategy import Search, Strategy, run_plan


def classes(*probs: float) -> list[dict]:
    """Class answers for classes 10, 11, ... with these probabilities."""
    return [{"index": 10 + i, "synset": f"n{i}", "name": f"thing{i}", "probability": p} for i, p in enumerate(probs)]


def hit(i: int, score: float, cls: int = 10) -> Hit:
    return Hit(i, f"img{i}.jpg", None, cls, score)


SIZES = {10: 2, 11: 40}.get


def size(cls: int) -> int:
    return SIZES(cls, 0)


@pytest.mark.parametrize("name, expected", [
    ("global", Strategy()),
    ("class", Strategy("class", 1)),
    ("class@3", Strategy("class", 3)),
    ("gated:0.4", Strategy("gated", 1, tau=0.4)),
    ("gated@2:0.25", Strategy("gated", 2, tau=0.25)),
    ("rerank:0.1", Strategy("rerank", beta=0.1)),
])
def test_names_round_trip(name: str, expected: Strategy) -> None:
    assert Strategy.parse(name) == expected
    assert Strategy.parse(str(expected)) == expected
    assert Strategy.from_json(expected.to_json()) == expected


@pytest.mark.parametrize("bad", ["everything", "gated", "rerank", "global@2", "class@0", "class@9", "gated:x",
                                 "rerank@2:0.1", "gated:1.2.3"])
def test_bad_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        Strategy.parse(bad)


def test_load_reads_a_recommendation_file_and_defaults_to_global(tmp_path: Path) -> None:
    path = tmp_path / "strategy.json"
    Recommendation(Strategy("gated", 1, tau=0.5).to_json(), "mAP@5", 0.8, 0.78, 0.7, "a set", "c", "e").write(path)
    assert Strategy.load(str(path)) == Strategy("gated", 1, tau=0.5)
    path.write_text(json.dumps(Strategy("class", 2).to_json()))                # a bare strategy
    assert Strategy.load(str(path)) == Strategy("class", 2)
    path.write_text(json.dumps({"strategy": Strategy().to_json(), "metric": "mAP@5"}))
    with pytest.raises(ValueError, match="not a recommendation: missing value"):
        Strategy.load(str(path))
    assert Strategy.load(None) == Strategy()
    assert Strategy.load(None, default=Strategy("class", 2)) == Strategy("class", 2)
    with pytest.raises(ValueError, match="does not exist"):
        Strategy.load(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not a strategy"):
        Strategy.load(str(tmp_path / "bad.json"))


def test_the_gate_searches_the_class_only_when_the_classifier_is_sure() -> None:
    gated = Strategy("gated", 1, tau=0.5)
    assert gated.wants_class(classes(0.5, 0.1)) and not gated.wants_class(classes(0.49, 0.3))
    assert Strategy("gated", 1, tau=0.0).wants_class(classes(0.0001))          # tau 0: class@1
    assert not Strategy("gated", 1, tau=1.0).wants_class(classes(1.0))        # tau 1: global
    assert Strategy("class", 1).wants_class(classes(0.01))
    assert not Strategy().wants_class(classes(0.99)) and not Strategy("rerank", beta=1).wants_class(classes(0.99))
    assert Strategy("class", 2).searched_classes(classes(0.5, 0.3, 0.2)) == [10, 11]


def test_a_full_class_answer_has_no_note_and_no_global_search() -> None:
    strategy = Strategy("class", 1)
    found = [hit(1, 0.9), hit(2, 0.8)]
    assert not strategy.needs_global(found, 2)
    assert strategy.finish(2, classes(0.6), found, None, size) == (found, None)


def test_a_short_class_answer_is_filled_from_global_and_says_why() -> None:
    strategy = Strategy("class", 1)
    found = [hit(1, 0.9), hit(2, 0.8)]
    assert strategy.needs_global(found, 5)
    everywhere = [hit(1, 0.9), hit(7, 0.85, 11), hit(2, 0.8), hit(8, 0.7, 11), hit(9, 0.6, 12)]
    hits, note = strategy.finish(5, classes(0.6), found, everywhere, size)
    assert [h.id for h in hits] == [1, 2, 7, 8, 9]                       # class first, then global, no repeats
    assert note == ("2 of 5 results from the class search: the predicted class 'thing0' has 2 gallery images; "
                    "3 filled from the global search")
    empty, note = strategy.finish(3, [{"index": 99, "name": "horse", "probability": 0.7}], [], everywhere, size)
    assert [h.id for h in empty] == [1, 7, 2] and "'horse' has no gallery images; 3 filled" in note


def test_without_fill_a_short_answer_stays_short_but_is_never_silent() -> None:
    strategy = Strategy("class", 2, fill=False)
    assert not strategy.needs_global([], 5)
    two = classes(0.4, 0.3)
    two[1]["index"] = 12                                   # a class with no gallery image
    hits, note = strategy.finish(5, two, [hit(1, 0.9), hit(2, 0.8)], None, size)
    assert len(hits) == 2 and note == ("2 of 5 results: the top 2 predicted classes ('thing0', 'thing1') have 2 "
                                       "gallery images; search with fill or the global strategy for more")
    # The classes hold enough images, but min_score dropped some: the note says so.
    hits, note = strategy.finish(5, classes(0.4, 0.3), [hit(3, 0.5, 11)], None, size)
    assert len(hits) == 1 and "have 42 gallery images, of which 1 pass min_score" in note


def test_rerank_orders_global_candidates_by_similarity_plus_the_class_prior() -> None:
    candidates = [hit(1, 0.90, cls=12), hit(2, 0.88, cls=10), hit(3, 0.80, cls=11), hit(4, 0.70, cls=10)]
    query = classes(0.5, 0.1)                     # class 10: 0.5, class 11: 0.1, class 12: not in the top
    assert Strategy("rerank", beta=0.0).finish(3, query, None, candidates, size)[0] == candidates[:3]
    hits, note = Strategy("rerank", beta=0.1).finish(3, query, None, candidates, size)
    assert [h.id for h in hits] == [2, 1, 3] and note is None   # re-ranked: 0.93, 0.90, 0.81 (4: 0.75)
    assert [h.score for h in hits] == [0.88, 0.90, 0.80]        # scores stay the similarities
    assert Strategy("rerank", beta=0.1).global_k(5) == 50 and Strategy().global_k(5) == 5


def test_the_plan_asks_one_class_search_then_one_global_search_for_the_rows_that_need_them() -> None:
    """The query order: a gated batch searches the sure queries' classes, then globally the unsure ones
    and the class answers that fell short; each answer is finished from its own searches."""
    batch = [classes(0.9, 0.05), classes(0.2, 0.1), classes(0.8, 0.1)]
    asked = []

    def search(request: Search) -> list[list[Hit]]:
        asked.append(request)
        if request.classes is not None:   # row 0 finds 2 of its class, row 2 none
            return [[hit(1, 0.9), hit(2, 0.8)], []]
        return [[hit(10 + q, 0.5 - q / 10, 11), hit(20 + q, 0.4 - q / 10, 11)] for q in request.rows]

    answers = run_plan(Strategy("gated", 1, tau=0.5).plan(batch, 2, size), search)
    assert asked == [Search([0, 2], 2, [[10], [10]]), Search([1, 2], 2)]
    assert [[h.id for h in hits] for hits, _ in answers] == [[1, 2], [11, 21], [12, 22]]
    assert [note is None for _, note in answers] == [True, True, False]
    asked.clear()
    assert run_plan(Strategy().plan(batch, 2, size), search) == [(hits, None) for hits in search(Search([0, 1, 2], 2))]
    assert asked[0] == Search([0, 1, 2], 2) and len(asked) == 2   # global: one search, no class search


def test_strategy_resolution_takes_the_most_specific_one_given() -> None:
    assert Strategy.resolve(None, None, None) == Strategy()
    assert Strategy.resolve(None, "class@2", {"kind": "gated", "tau": 0.3}) == Strategy("class", 2)
    assert Strategy.resolve("rerank:0.1", "class@2") == Strategy("rerank", beta=0.1)
    assert Strategy.resolve(None, None, {"kind": "gated", "tau": 0.3}, fill=False) == Strategy("gated", tau=0.3,
                                                                                               fill=False)


def test_calibration_folds_split_every_class_in_halves_seeded() -> None:
    labels = np.array(["a"] * 6 + ["b"] * 5 + ["c"] * 2, dtype=object)
    folds = calibration_folds(labels, seed=0)
    for label, size in (("a", 6), ("b", 5), ("c", 2)):
        assert sorted(np.bincount(folds[labels == label], minlength=2)) == [size // 2, size - size // 2]
    np.testing.assert_array_equal(calibration_folds(labels, seed=0), folds)


def test_the_recommendation_is_global_unless_another_gains_significantly() -> None:
    rng = np.random.default_rng(0)
    glob = rng.uniform(0.3, 0.9, 400)
    better = glob + 0.05                                           # better on every query
    noise = glob + rng.normal(0.0, 0.2, 400)                       # better on average by luck, not for real
    assert recommend(np.stack([glob, better])) == 1
    assert recommend(np.stack([glob, glob.copy()])) == 0           # equal: the simpler (earlier) one
    assert recommend(np.stack([glob, glob - 0.05])) == 0
    lucky = max(range(50), key=lambda s: (glob + np.random.default_rng(s).normal(0, 0.2, 400)).mean())
    sweep = np.stack([glob] + [glob + np.random.default_rng(s).normal(0, 0.2, 400) for s in range(50)])
    assert sweep[1 + lucky].mean() > glob.mean()                   # the best of 50 noisy ones looks better ...
    assert recommend(sweep) == 0                                   # ... and is not taken
    # A small real gain is taken on many queries, not on a few (the same per-query noise).
    small = glob + 0.01 + rng.normal(0.0, 0.05, 400)
    assert recommend(np.stack([glob, small])) == 1
    assert recommend(np.stack([glob[:20], small[:20]])) == 0
    # Confidence 0 and a negative least gain: whatever measures best.
    assert recommend(np.stack([glob, noise]), min_gain=-1, confidence=0) == int(noise.mean() > glob.mean())
    # Of two strategies that both beat global, the simpler (earlier) one unless the other is
    # significantly better than it too.
    wobble = rng.normal(0.0, 0.05, 400)
    alike = better + wobble - wobble.mean() + 0.001            # 0.001 better on average, within the noise
    assert recommend(np.stack([glob, better, alike])) == 1
    assert recommend(np.stack([glob, better, better + 0.03])) == 2
    bounds = gain_bounds(np.stack([glob, better, glob]), 0.95)
    assert bounds[0] <= 1e-12 and bounds[1] == pytest.approx(0.05, abs=1e-9) and bounds[2] <= 0


def test_the_sweep_covers_every_strategy_and_both_ends_of_the_gate() -> None:
    top1 = np.linspace(0.01, 0.99, 101)
    grid = strategy_grid(top1, top_n=3)
    names = [str(s) for s in grid]
    assert names[:3] == ["global", "class@1", "class@3"] and len(set(names)) == len(names)
    taus = [s.tau for s in grid if s.kind == "gated" and s.top_n == 1]
    assert len(taus) == 19 and 0.05 < min(taus) < 0.1 and 0.9 < max(taus) < 0.95
    assert {s.top_n for s in grid if s.kind == "gated"} == {1, 3}
    assert [s.beta for s in grid if s.kind == "rerank"] == list(RERANK_BETAS)


def test_an_evaluations_crop_threshold_is_checked() -> None:
    assert EvalConfig(output="out", dataset="mnist5000").crop_min_score == 0.5
    with pytest.raises(ValueError, match=r"CropPolicy.min_score must be in \[0, 1\], got 1.5"):
        EvalConfig(output="out", dataset="mnist5000", crop_min_score=1.5)
