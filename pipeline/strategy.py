"""Search strategies: which part of the gallery a query searches, and how its results are ordered.

    global          embedding similarity over the whole gallery (the default: see docs/QUALITY.md)
    class@N         Approach 2: among the gallery images of the query's top N predicted classes
    gated@N:TAU     class@N when the classifier's top-1 probability is at least TAU, else global
                    (TAU = 0 is class@N; TAU >= 1 never searches a class: global)
    rerank:BETA     the global top ``candidates`` re-ordered by similarity + BETA x the query's
                    probability of each candidate's class (BETA = 0 is global)

A class-restricted search that finds fewer than k results says so and why in the answer's
``note``, and with ``fill`` (the default) tops up from the global search.

The query order exists once, in :meth:`Strategy.plan`: a generator that yields the searches a batch
of queries needs (:class:`Search`: the class search of the rows that want one, then the global search
of the rows that still need one) and receives their hits. Every query path drives the same plan over
its own searcher: :func:`run_plan` over a loaded index (:class:`pipeline.search.QueryEngine`, hence
``jobs.search`` and ``jobs.evaluate``), :func:`run_plan_async` over the retriever replicas (the
service's ingress, ``serve/app.py``). :meth:`Strategy.resolve` is the one rule for which strategy a
query uses: the request's, else the service's (or engine's), else the index's, else global.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pipeline.index import Hit
from pipeline.manifests import Recommendation

STRATEGY_KINDS = ("global", "class", "gated", "rerank")
_NAME = re.compile(r"^(?P<kind>global|class|gated|rerank)(@(?P<top_n>\d+))?(:(?P<value>[0-9.]+))?$")


@dataclass(frozen=True)
class Strategy:
    """A search strategy and its parameters (see the module docstring).

    Attributes:
        kind: ``global``, ``class``, ``gated`` or ``rerank``.
        top_n: predicted classes searched (``class``, ``gated``).
        tau: least top-1 probability for a class search (``gated``).
        beta: weight of the query's class probability (``rerank``).
        candidates: global results re-ranked (``rerank``).
        fill: top up a class search that finds fewer than k from the global search.
    """

    kind: str = "global"
    top_n: int = 1
    tau: float = 0.0
    beta: float = 0.0
    candidates: int = 50
    fill: bool = True

    def __post_init__(self) -> None:
        if self.kind not in STRATEGY_KINDS:
            raise ValueError(f"strategy must be one of {STRATEGY_KINDS}, got {self.kind!r}")
        if not 1 <= self.top_n <= 5:
            raise ValueError(f"a strategy's top_n must be 1 to 5 (the classes a query keeps), got {self.top_n}")
        if self.tau < 0 or self.beta < 0 or self.candidates < 1:
            raise ValueError("tau and beta must be >= 0 and candidates >= 1")

    @classmethod
    def parse(cls, name: str, fill: bool = True) -> "Strategy":
        """``global``, ``class``, ``class@3``, ``gated:0.4``, ``gated@2:0.4`` or ``rerank:0.1``.

        Raises:
            ValueError: anything else.
        """
        match = _NAME.match(name.strip())
        if match is None:
            raise ValueError(f"unknown strategy {name!r}; use global, class[@N], gated[@N]:TAU or rerank:BETA")
        kind, value = match["kind"], match["value"]
        top_n = int(match["top_n"] or 1)
        if (kind in ("gated", "rerank")) != (value is not None) or (match["top_n"] and kind in ("global", "rerank")):
            raise ValueError(f"strategy {name!r}: write global, class[@N], gated[@N]:TAU or rerank:BETA")
        try:
            number = float(value) if value is not None else 0.0
        except ValueError:
            raise ValueError(f"strategy {name!r}: {value!r} is not a number") from None
        return cls(kind, top_n=top_n, tau=number if kind == "gated" else 0.0,
                   beta=number if kind == "rerank" else 0.0, fill=fill)

    @classmethod
    def from_json(cls, raw: dict) -> "Strategy":
        """From :meth:`to_json`."""
        known = {k: raw[k] for k in ("kind", "top_n", "tau", "beta", "candidates", "fill") if k in raw}
        if "kind" not in known:
            raise ValueError(f"a strategy needs a 'kind' ({', '.join(STRATEGY_KINDS)}), got {raw}")
        return cls(**known)

    @classmethod
    def load(cls, value: "str | dict | Strategy | None", default: "Strategy | None" = None) -> "Strategy":
        """A strategy from a name, a JSON file (a :class:`pipeline.manifests.Recommendation` from
        ``jobs.evaluate --recommend``, or a bare :meth:`to_json`), a dict or None (``default``, else global).

        Raises:
            ValueError: an unknown name or a malformed file.
        """
        if value is None:
            return default or cls()
        if isinstance(value, Strategy):
            return value
        if isinstance(value, dict):
            return cls.from_json(value)
        if value.endswith(".json") or Path(value).is_file():
            path = Path(value)
            try:
                raw = json.loads(path.read_text())
                return cls.from_json(Recommendation.from_json(raw).strategy if "strategy" in raw else raw)
            except FileNotFoundError:
                raise ValueError(f"strategy file {path} does not exist") from None
            except (json.JSONDecodeError, TypeError, AttributeError) as exc:
                raise ValueError(f"strategy file {path} is not a strategy ({exc})") from None
        return cls.parse(value)

    @classmethod
    def resolve(cls, *choices: "str | dict | Strategy | None", fill: bool | None = None) -> "Strategy":
        """The strategy a query uses: the first of ``choices`` that is given, most specific first
        (the request's, the service's or engine's, the index manifest's), else global; ``fill``
        (None: the strategy's own) overrides its fill.

        Raises:
            ValueError: the chosen one is an unknown name or a malformed file.
        """
        chosen = next((c for c in choices if c is not None), None)
        return cls.load(chosen).with_fill(fill)

    def with_fill(self, fill: bool | None) -> "Strategy":
        return self if fill is None or fill == self.fill else replace(self, fill=fill)

    def __str__(self) -> str:
        if self.kind == "global":
            return "global"
        if self.kind == "class":
            return f"class@{self.top_n}"
        if self.kind == "gated":
            return f"gated@{self.top_n}:{self.tau:g}"
        return f"rerank:{self.beta:g}"

    def to_json(self) -> dict:
        return {"name": str(self), **asdict(self)}

    # ---- the query order ------------------------------------------------------------------------

    def plan(self, classes: Sequence[Sequence[dict]], k: int,
             class_size: Callable[[int], int]) -> "Generator[Search, list[list[Hit]], list[Answer]]":
        """The searches a batch of queries needs, in order, and their answers.

        A generator: it yields :class:`Search` requests (at most one class search, then at most one
        global search), each to be sent back the hits of its rows in order, and returns per query
        its hits and note (:meth:`finish`). Drive it with :func:`run_plan` or :func:`run_plan_async`.

        Args:
            classes: per query, its class answers (``index``, ``name``, ``probability``), best first.
            k: results wanted per query.
            class_size: gallery images of a class (for the note of a short class answer).
        """
        class_hits: list[list[Hit] | None] = [None] * len(classes)
        rows = [q for q, row in enumerate(classes) if self.wants_class(row)]
        if rows:
            found = yield Search(rows, k, [self.searched_classes(classes[q]) for q in rows])
            for q, hits in zip(rows, found, strict=True):
                class_hits[q] = hits
        global_hits: list[list[Hit] | None] = [None] * len(classes)
        rows = [q for q in range(len(classes)) if self.needs_global(class_hits[q], k)]
        if rows:
            found = yield Search(rows, self.global_k(k))
            for q, hits in zip(rows, found, strict=True):
                global_hits[q] = hits
        return [self.finish(k, row, class_hits[q], global_hits[q], class_size) for q, row in enumerate(classes)]

    # ---- the steps of the plan ------------------------------------------------------------------

    def wants_class(self, classes: Sequence[dict]) -> bool:
        """Whether this query searches its predicted classes (``classes``: its class answers, best first)."""
        if self.kind == "class":
            return True
        return self.kind == "gated" and self.tau < 1 and bool(classes) and classes[0]["probability"] >= self.tau

    def searched_classes(self, classes: Sequence[dict]) -> list[int]:
        return [c["index"] for c in classes[: self.top_n]]

    def needs_global(self, class_hits: list[Hit] | None, k: int) -> bool:
        """Whether a global search is needed after the class search (None: there was none)."""
        return class_hits is None or (self.fill and len(class_hits) < k)

    def global_k(self, k: int) -> int:
        """How many global results to ask for."""
        return max(k, self.candidates) if self.kind == "rerank" else k

    def finish(self, k: int, classes: Sequence[dict], class_hits: list[Hit] | None,
               global_hits: list[Hit] | None, class_size: Callable[[int], int]) -> tuple[list[Hit], str | None]:
        """The answer's hits, best first, and a note when a class search fell short of k.

        Args:
            k: results wanted.
            classes: the query's class answers (``index``, ``name``, ``probability``), best first.
            class_hits: the class search's hits (None: no class search).
            global_hits: the global search's hits (None: none was needed).
            class_size: gallery images of a class.
        """
        if class_hits is None:
            hits = list(global_hits or [])
            if self.kind == "rerank" and self.beta > 0:
                prior = {c["index"]: c["probability"] for c in classes}
                hits.sort(key=lambda h: -(h.score + self.beta * prior.get(h.cls, 0.0)))
            return hits[:k], None
        hits = list(class_hits)
        if len(hits) >= k:
            return hits[:k], None
        searched = classes[: self.top_n]
        names = ", ".join(f"'{c['name']}'" for c in searched)
        held = sum(class_size(c["index"]) for c in searched)
        what = f"the predicted class {names}" if len(searched) == 1 else f"the top {len(searched)} predicted classes ({names})"
        why = f"{what} {'has' if len(searched) == 1 else 'have'} {held or 'no'} gallery image{'' if held == 1 else 's'}"
        if held >= k:
            why += f", of which {len(hits)} pass min_score"
        if not self.fill:
            return hits, f"{len(hits)} of {k} results: {why}; search with fill or the global strategy for more"
        seen = {h.id for h in hits}
        extra = [h for h in (global_hits or []) if h.id not in seen][: k - len(hits)]
        return hits + extra, f"{len(hits)} of {k} results from the class search: {why}; {len(extra)} filled " \
                             f"from the global search"


#: A query's answer: its hits, best first, and a note when a class search fell short of k.
Answer = tuple[list[Hit], str | None]


@dataclass(frozen=True)
class Search:
    """One search a plan asks for.

    Attributes:
        rows: the queries of the batch it is for (positions).
        k: results wanted per query.
        classes: per row, the classes to search among; None: the whole gallery (global search).
    """

    rows: list[int]
    k: int
    classes: list[list[int]] | None = None


def run_plan(plan: Generator[Search, list[list[Hit]], list[Answer]],
             search: Callable[[Search], list[list[Hit]]]) -> list[Answer]:
    """Drives a :meth:`Strategy.plan` with a searcher that answers each :class:`Search`."""
    try:
        request = next(plan)
        while True:
            request = plan.send(search(request))
    except StopIteration as done:
        return done.value


async def run_plan_async(plan: Generator[Search, list[list[Hit]], list[Answer]],
                         search: Callable[[Search], Awaitable[list[list[Hit]]]]) -> list[Answer]:
    """:func:`run_plan` with an asynchronous searcher (the service's retriever replicas)."""
    try:
        request = next(plan)
        while True:
            request = plan.send(await search(request))
    except StopIteration as done:
        return done.value
