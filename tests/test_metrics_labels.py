"""mAP@k, precision@k and recall@k against hand-computed cases; label spaces."""

from __future__ import annotations

import pytest

from pipeline.labels import label_space_for, load_label_space
from pipeline.metrics import average_precision_at_k, map_at_k, precision_at_k, recall_at_k

# Query label "a"; retrieved: a, b, a, a, c.  rel = 1,0,1,1,0
RETRIEVED = [["a", "b", "a", "a", "c"]]


def test_ap_hand_computed() -> None:
    # k=1: P@1=1 -> 1/min(1,R)=1
    assert average_precision_at_k(RETRIEVED, ["a"], [10], 1)[0] == pytest.approx(1.0)
    # k=3: (1/1 + 2/3) / min(3,10) = (5/3)/3 = 5/9
    assert average_precision_at_k(RETRIEVED, ["a"], [10], 3)[0] == pytest.approx(5 / 9)
    # k=5: (1 + 2/3 + 3/4) / 5 = 29/60
    assert average_precision_at_k(RETRIEVED, ["a"], [10], 5)[0] == pytest.approx(29 / 60)
    # Only 3 relevant items exist: k=5 normalises by min(5, 3) = 3 -> 29/36
    assert average_precision_at_k(RETRIEVED, ["a"], [3], 5)[0] == pytest.approx(29 / 36)


def test_map_over_queries_and_edge_cases() -> None:
    retrieved = [["x", "x", "y"], ["y", "x", "x"], ["z", "z", "z"]]
    queries = ["x", "x", "q"]
    # q1: rel 1,1,0 -> (1+1)/min(3,2)=1 ; q2: rel 0,1,1 -> (1/2+2/3)/2 = 7/12 ; q3: R=0 -> 0
    assert map_at_k(retrieved, queries, [2, 2, 0], 3) == pytest.approx((1 + 7 / 12 + 0) / 3)
    # Perfect list when R > k scores 1.
    assert map_at_k([["a", "a"]], ["a"], [100], 2) == pytest.approx(1.0)
    # A result list shorter than k counts the missing places as misses.
    assert map_at_k([["a"]], ["a"], [5], 3) == pytest.approx(1 / 3)


def test_precision_and_recall_hand_computed() -> None:
    assert precision_at_k(RETRIEVED, ["a"], 5) == pytest.approx(3 / 5)
    assert precision_at_k(RETRIEVED, ["a"], 2) == pytest.approx(1 / 2)
    assert recall_at_k(RETRIEVED, ["a"], [6], 5) == pytest.approx(3 / 6)
    assert recall_at_k(RETRIEVED, ["a"], [0], 5) == 0.0


def test_metric_input_errors() -> None:
    with pytest.raises(ValueError):
        map_at_k(RETRIEVED, ["a"], [1], 0)
    with pytest.raises(ValueError):
        map_at_k(RETRIEVED, ["a", "b"], [1, 1], 3)
    with pytest.raises(ValueError):
        map_at_k(RETRIEVED, ["a"], [-1], 3)


def test_imagenet_label_spaces_ship_offline() -> None:
    in1k = load_label_space("imagenet-1k")
    assert len(in1k) == 1000
    assert in1k.id_of(281) == "n02123045" and "tabby" in in1k.name_of(281)
    assert in1k.index_of("n02123045") == 281
    in22k = load_label_space("imagenet-22k")
    assert len(in22k) == 21841 and all(s.startswith("n") for s in in22k.ids[:100])
    assert len(load_label_space("imagenet-12k")) == 11821
    assert label_space_for(21841) is in22k
    with pytest.raises(KeyError, match="not a class"):
        in1k.index_of("n99999999")


def test_generic_label_space() -> None:
    space = label_space_for(7)
    assert space.name == "generic-7" and space.ids[3] == "class_3"
    with pytest.raises(ValueError, match="unknown label space"):
        load_label_space("imagenet-5k")
