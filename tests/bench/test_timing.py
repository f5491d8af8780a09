"""The benchmark harness's interleaved timer, on a fake clock (no real timing in tests)."""

from __future__ import annotations

import pytest

from bnkit.bench import timing


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    return fake


def test_rounds_rotate_and_ratios_cancel_drift(clock):
    calls: list[str] = []

    def make(name: str, cost: float):
        def fn() -> None:
            timed = len(calls) - 6  # 3 warm-up calls each come first
            calls.append(name)
            # the machine is 3x slower in every other round: per-round ratios must not care
            slow = timed >= 0 and (timed // 2) % 2 == 1
            clock.now += cost * (3.0 if slow else 1.0)

        return fn

    res = timing.interleaved_times({"a": make("a", 2e-3), "b": make("b", 1e-3)}, runs=16, warmup=3)
    assert len(res.times["a"]) == len(res.times["b"]) == 16
    assert calls[6:10] == ["a", "b", "b", "a"]  # the order rotates between rounds
    assert res.ratio("a", "b") == pytest.approx(2.0)
    assert sorted(set(round(t * 1e3, 9) for t in res.times["b"])) == [1.0, 3.0]


def test_fast_calls_are_repeated_within_a_sample(clock):
    n = {"fast": 0, "slow": 0}

    def fast() -> None:
        n["fast"] += 1
        clock.now += 10e-6

    def slow() -> None:
        n["slow"] += 1
        clock.now += 1e-3

    res = timing.interleaved_times({"fast": fast, "slow": slow}, runs=15, warmup=2)
    reps = (n["fast"] - 2) // 15
    assert reps * 10e-6 >= timing.MIN_SAMPLE_S
    assert n["slow"] == 2 + 15
    assert res.median("fast") == pytest.approx(10e-6)
    assert res.ratio("slow", "fast") == pytest.approx(100.0)


def test_same_calls_share_the_largest_count(clock):
    n = {"a": 0, "b": 0, "copy": 0}
    cost = {"a": 134e-6, "b": 211e-6, "copy": 5e-6}

    def make(name: str):
        def fn() -> None:
            n[name] += 1
            clock.now += cost[name]

        return fn

    fns = {name: make(name) for name in cost}
    res = timing.interleaved_times(fns, runs=15, warmup=1, same_calls=("a", "b"))
    # a alone needs 2 calls per sample to last MIN_SAMPLE_S, b needs 1: both take 2; the copy its own 41
    assert (n["a"] - 1) // 15 == (n["b"] - 1) // 15 == 2
    copies = (n["copy"] - 1) // 15
    assert copies > 2 and copies * 5e-6 >= timing.MIN_SAMPLE_S
    assert res.ratio("b", "a") == pytest.approx(211 / 134)
    with pytest.raises(ValueError, match="same_calls"):
        timing.interleaved_times(fns, runs=15, same_calls=("a", "nope"))


def test_runs_are_at_least_fifteen(clock):
    def fn() -> None:
        clock.now += 1e-3

    assert len(timing.interleaved_times({"f": fn}, runs=3).times["f"]) == timing.MIN_RUNS


def test_fixed_calls_per_sample_and_a_given_clock():
    own = FakeClock()  # a clock passed in, not time.perf_counter
    n = {"f": 0}

    def fn() -> None:
        n["f"] += 1
        own.now += 1e-6

    res = timing.interleaved_times({"f": fn}, runs=15, warmup=1, calls=50, clock=own)
    assert n["f"] == 1 + 15 * 50
    assert res.median("f") == pytest.approx(1e-6)
    assert res.ratios("f", "f") == [1.0] * 15
