"""The ingress's pixel budget (serve/budget.py), on its own: no Ray, no HTTP."""

from __future__ import annotations

import asyncio

import pytest

from serve.budget import BudgetExhausted, PixelBudget


async def _work(budget: PixelBudget, pixels: int, log: list, name: str,
                release: asyncio.Event | None = None, wait_s: float | None = None) -> None:
    """Holds ``pixels`` until ``release`` is set (without one: for one turn of the event loop).

    No test times anything: a request holds its pixels until the test lets it go, and waits for its
    turn without a limit (``wait_s=None``) unless the limit is what the test is about.
    """
    async with budget.hold(pixels, wait_s):
        log.append(("start", name, budget.in_use))
        assert budget.in_use <= budget.limit
        if release is None:
            await asyncio.sleep(0)  # yield once: the others run before this one lets go
        else:
            await release.wait()
        log.append(("end", name, budget.in_use))


async def _until_waiting(budget: PixelBudget, count: int) -> None:
    """Returns once ``count`` requests are queued in ``budget`` (they get there without any time
    passing: each needs a few turns of the event loop)."""
    for _ in range(1000):
        if budget.waiting == count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{budget.waiting} requests queued, never {count}")


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
    async def main() -> tuple[PixelBudget, list, list]:
        budget, log = PixelBudget(100), []
        release = asyncio.Event()
        first = asyncio.create_task(_work(budget, 60, log, "big1", release))
        await asyncio.sleep(0)
        second = asyncio.create_task(_work(budget, 60, log, "big2"))
        await _until_waiting(budget, 1)
        third = asyncio.create_task(_work(budget, 10, log, "small"))  # would fit beside big1, but big2 is first
        await _until_waiting(budget, 2)
        before = [e[1] for e in log if e[0] == "start"]  # big1 holds its pixels until released
        release.set()
        await asyncio.gather(first, second, third)
        return budget, log, before

    budget, log, before = asyncio.run(main())
    assert before == ["big1"]
    assert [e[1] for e in log if e[0] == "start"] == ["big1", "big2", "small"]
    assert budget.stats["waited"] == 2 and budget.waiting == 0 and budget.in_use == 0


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
    async def main() -> tuple[PixelBudget, list, dict]:
        budget, log, outcomes = PixelBudget(100), [], {}
        release = asyncio.Event()

        async def attempt(name: str, wait_s: float | None, hold: asyncio.Event | None = None) -> None:
            try:
                await _work(budget, 80, log, name, hold, wait_s=wait_s)
                outcomes[name] = "done"
            except BudgetExhausted as exc:
                outcomes[name] = str(exc)

        # The holder keeps its pixels until the impatient one has been refused: its 0.05 s run out
        # whatever the machine's load, and the patient one (no limit) queued behind it goes next.
        holder = asyncio.create_task(attempt("holder", None, release))
        await asyncio.sleep(0)
        impatient = asyncio.create_task(attempt("impatient", 0.05))
        await _until_waiting(budget, 1)
        patient = asyncio.create_task(attempt("patient", None))
        await _until_waiting(budget, 2)
        await impatient
        waiting_after_refusal = budget.waiting  # the patient one, still in line
        release.set()
        await asyncio.gather(holder, patient)
        return budget, log, outcomes | {"waiting after the refusal": waiting_after_refusal}

    budget, log, result = asyncio.run(main())
    assert result["holder"] == "done" and result["patient"] == "done"
    assert "did not fit in the budget of 100 within 0.05 s" in result["impatient"]
    assert result["waiting after the refusal"] == 1
    assert [e[1] for e in log if e[0] == "start"] == ["holder", "patient"]
    assert budget.stats["refused"] == 1 and budget.stats["admitted"] == 2 and budget.in_use == 0


def test_a_cancelled_waiter_frees_its_turn() -> None:
    async def main() -> tuple[PixelBudget, list]:
        budget, log = PixelBudget(100), []
        release = asyncio.Event()
        holder = asyncio.create_task(_work(budget, 100, log, "holder", release))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(_work(budget, 50, log, "gone"))
        await _until_waiting(budget, 1)  # queued behind the holder, which keeps the whole budget
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert budget.waiting == 0  # it left the line
        release.set()
        await asyncio.gather(holder, _work(budget, 50, log, "next"))
        return budget, log

    budget, log = asyncio.run(main())
    assert [e[1] for e in log if e[0] == "start"] == ["holder", "next"]
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
