"""The ingress's pixel budget (serve/budget.py), on its own: no Ray, no HTTP."""

from __future__ import annotations

import asyncio

import pytest

from serve.budget import BudgetExhausted, PixelBudget


async def _work(budget: PixelBudget, pixels: int, log: list, name: str, seconds: float = 0.02,
                wait_s: float = 5.0) -> None:
    async with budget.hold(pixels, wait_s):
        log.append(("start", name, budget.in_use))
        assert budget.in_use <= budget.limit
        await asyncio.sleep(seconds)
        log.append(("end", name, budget.in_use))


def test_many_large_requests_stay_within_the_budget_and_all_finish() -> None:
    async def main() -> tuple[PixelBudget, list]:
        budget, log = PixelBudget(100), []
        await asyncio.gather(*(_work(budget, 40, log, f"r{i}") for i in range(12)))
        return budget, log

    budget, log = asyncio.run(main())
    assert [e for e in log if e[0] == "end"] and len(log) == 24
    assert budget.stats["peak_pixels"] == 80  # two of 40 fit in 100, never three
    assert budget.stats["admitted"] == 12 and budget.stats["waited"] == 10 and budget.in_use == 0
    # First come, first served: they start in the order they asked.
    assert [e[1] for e in log if e[0] == "start"] == [f"r{i}" for i in range(12)]


def test_a_small_request_does_not_overtake_a_waiting_large_one() -> None:
    async def main() -> list:
        budget, log = PixelBudget(100), []
        first = asyncio.create_task(_work(budget, 60, log, "big1", seconds=0.05))
        await asyncio.sleep(0)
        second = asyncio.create_task(_work(budget, 60, log, "big2"))
        await asyncio.sleep(0)
        third = asyncio.create_task(_work(budget, 10, log, "small"))  # would fit beside big1, but big2 is first
        await asyncio.gather(first, second, third)
        return log

    starts = [e[1] for e in asyncio.run(main()) if e[0] == "start"]
    assert starts == ["big1", "big2", "small"]


def test_an_image_larger_than_the_budget_runs_alone() -> None:
    async def main() -> tuple[PixelBudget, list]:
        budget, log = PixelBudget(100), []
        await asyncio.gather(_work(budget, 30, log, "a"), _work(budget, 500, log, "huge"), _work(budget, 30, log, "b"))
        return budget, log

    budget, log = asyncio.run(main())
    huge = [e for e in log if e[1] == "huge"]
    assert huge[0][2] == 100 and budget.stats["peak_pixels"] == 100  # it held the whole budget, alone
    assert budget.in_use == 0


def test_a_request_that_waits_too_long_is_refused_and_leaves_the_line() -> None:
    async def main() -> tuple[PixelBudget, list, list]:
        budget, log, outcomes = PixelBudget(100), [], []

        async def attempt(name: str, wait_s: float) -> None:
            try:
                await _work(budget, 80, log, name, seconds=0.2 if name == "holder" else 0.01, wait_s=wait_s)
                outcomes.append((name, "done"))
            except BudgetExhausted as exc:
                outcomes.append((name, str(exc)))

        holder = asyncio.create_task(attempt("holder", 1.0))
        await asyncio.sleep(0)
        await asyncio.gather(attempt("impatient", 0.05), attempt("patient", 5.0), holder)
        return budget, log, outcomes

    budget, log, outcomes = asyncio.run(main())
    result = dict(outcomes)
    assert result["holder"] == "done" and result["patient"] == "done"
    assert "did not fit in the budget of 100 within 0.05 s" in result["impatient"]
    assert budget.stats["refused"] == 1 and budget.in_use == 0


def test_a_cancelled_waiter_frees_its_turn() -> None:
    async def main() -> PixelBudget:
        budget, log = PixelBudget(100), []
        holder = asyncio.create_task(_work(budget, 100, log, "holder", seconds=0.05))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(_work(budget, 50, log, "gone"))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.gather(holder, _work(budget, 50, log, "next"))
        return budget

    budget = asyncio.run(main())
    assert budget.in_use == 0 and budget.stats["refused"] == 0 and budget.stats["admitted"] == 2


def test_bad_budget() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        PixelBudget(0)


def test_the_query_pixel_limit_is_the_services_or_the_gallerys_when_lower() -> None:
    from types import SimpleNamespace

    from serve.app import AppConfig, query_pixel_limit

    config = AppConfig(index="x")
    assert config.max_query_pixels == 50_000_000 and config.decode_pixel_budget == 100_000_000
    assert query_pixel_limit(config, SimpleNamespace(max_pixels=100_000_000)) == 50_000_000
    assert query_pixel_limit(config, SimpleNamespace(max_pixels=160_000)) == 160_000
    for bad in ({"max_query_pixels": 0}, {"decode_pixel_budget": 0}, {"decode_wait_s": -1}):
        with pytest.raises(ValueError, match="decode_wait_s"):
            AppConfig(index="x", **bad)
