"""The detector and repair of implausible Qwen3 timestamps (deployments/backends/qwen3_repair.py).

Pure logic on synthetic raw outputs: each known failure mode must be found and a clean output must
not be. The repair's model call is a plain function standing in for the second batched pass (the
real one runs in tests/test_backend_qwen3.py). Seeded loops instead of Hypothesis: qwen_asr, loaded
by the backend tests in the same process, switches the CPU to flush subnormals, and Hypothesis then
refuses to generate floats.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import pytest

from deployments.backends.base import UnitTiming
from deployments.backends.qwen3_repair import (
    MAX_REPAIR_SPANS,
    RawAlignment,
    RepairPlan,
    Window,
    _outside_longest_ordered_run,
    implausible_spans,
    plan_repair,
    repaired_timings,
)
from serve_app.text.flags import FLAGS, INTERPOLATED, REPAIRED

STEP = 0.08
Bounds = tuple[float, float]


def raw(bounds: Sequence[Bounds], confidence: float = 0.9, words: Sequence[str] | None = None) -> RawAlignment:
    words = tuple(words) if words is not None else tuple(f"w{index}" for index in range(len(bounds)))
    return RawAlignment(words, tuple(bounds), (confidence,) * len(bounds))


def repair(
    first: RawAlignment, duration: float, realign: Callable[[Window, tuple[str, ...]], RawAlignment | None]
) -> tuple[RepairPlan, list[UnitTiming]]:
    """What the backend does, with `realign` in place of the second batched model call."""
    plan = plan_repair(first.bounds, duration, STEP)
    answers = [realign(window, first.words[window.units.start : window.units.stop]) for window in plan.windows]
    return plan, repaired_timings(first, duration, STEP, plan, answers)


def assert_well_formed(timings: list[UnitTiming], first: RawAlignment, duration: float) -> None:
    assert [timing.text for timing in timings] == list(first.words)
    boundaries = [time for timing in timings for time in (timing.start, timing.end)]
    assert boundaries == sorted(boundaries)
    assert all(0.0 <= time <= duration for time in boundaries)
    for timing in timings:
        assert 0.0 <= timing.confidence <= 1.0
        assert set(timing.flags) <= set(FLAGS) and len(timing.flags) <= 1
        if INTERPOLATED in timing.flags:
            assert timing.confidence == 0.0


# The detector.


def test_a_clean_output_has_nothing_implausible() -> None:
    bounds = [(0.0, 0.32), (0.32, 0.56), (0.72, 1.04), (1.04, 1.6), (2.4, 2.96)]
    assert implausible_spans(bounds, duration=3.0, step=STEP) == []


def test_a_tight_but_possible_ending_is_not_a_pile_up() -> None:
    # Two one-step units in the last two steps, and a last end one step past the audio (grid rounding).
    assert implausible_spans([(0.2, 0.5), (2.8, 2.88), (2.88, 2.96)], duration=2.95, step=STEP) == []
    assert implausible_spans([(0.2, 2.4), (2.5, 3.03)], duration=2.95, step=STEP) == []


def test_zero_length_units_are_implausible() -> None:
    bounds = [(0.0, 0.3), (0.4, 0.4), (0.5, 0.9), (1.2, 1.2)]
    assert implausible_spans(bounds, duration=2.0, step=STEP) == [range(1, 2), range(3, 4)]


def test_a_run_of_identical_starts_is_implausible_as_a_whole() -> None:
    # The run's last unit has a length of its own, but shares its start with two zero-length ones.
    bounds = [(0.0, 0.24), (0.4, 0.4), (0.4, 0.4), (0.4, 0.8), (0.9, 1.2)]
    assert implausible_spans(bounds, duration=2.0, step=STEP) == [range(1, 4)]


def test_units_piled_up_at_the_end_of_the_audio_are_implausible() -> None:
    # The last three units start in the last three steps: 12.5 units a second.
    bounds = [(0.0, 0.4), (0.5, 0.9), (1.0, 1.5), (2.76, 2.84), (2.84, 2.92), (2.92, 3.0)]
    assert implausible_spans(bounds, duration=3.0, step=STEP) == [range(3, 6)]
    # The same units with one more step between the first two starts of the run are possible speech.
    spread = [*bounds[:3], (2.68, 2.84), (2.84, 2.92), (2.92, 3.0)]
    assert implausible_spans(spread, duration=3.0, step=STEP) == []


def test_a_pile_up_grows_to_every_unit_squeezed_into_the_end() -> None:
    squeezed = [(3.6 + 0.08 * index, 3.68 + 0.08 * index) for index in range(5)]  # five in the last 0.4 s
    assert implausible_spans([(0.0, 1.0), *squeezed], duration=4.0, step=STEP) == [range(1, 6)]


def test_times_beyond_the_audio_are_implausible() -> None:
    # What the tiny random checkpoint answers for a 3 s clip: times at the head's far end.
    bounds = [(0.1, 0.4), (205.44, 205.44), (395.68, 395.68), (0.6, 0.9)]
    assert implausible_spans(bounds, duration=3.0, step=STEP) == [range(1, 3)]
    assert implausible_spans([(0.1, 0.4), (0.5, 3.2)], duration=3.0, step=STEP) == [range(1, 2)]


def test_out_of_order_times_are_implausible() -> None:
    # A unit that jumps back, and a unit that ends before it starts.
    assert implausible_spans([(0.0, 0.3), (0.4, 0.6), (0.2, 0.3), (0.7, 0.9)], 1.0, STEP) == [range(2, 3)]
    assert implausible_spans([(0.0, 0.3), (0.4, 0.6), (0.8, 0.7), (0.9, 1.0)], 1.2, STEP) == [range(2, 3)]
    # A unit that jumps ahead of the ones after it.
    assert implausible_spans([(0.0, 0.3), (1.5, 1.7), (0.4, 0.6), (0.7, 0.9), (1.0, 1.2)], 2.0, STEP) == [
        range(1, 2)
    ]


def test_beyond_audio_times_cannot_outvote_the_ordered_ones() -> None:
    # Counted in the ordered run, the three beyond-audio units would displace the two good ones after them.
    bounds = [(0.1, 0.3), (5.0, 5.1), (5.2, 5.3), (5.4, 5.5), (0.5, 0.7), (0.8, 1.0)]
    assert implausible_spans(bounds, duration=2.0, step=STEP) == [range(1, 4)]


def test_the_ordered_run_is_a_longest_one() -> None:
    generator = random.Random(20261125)
    for _ in range(300):
        values = [generator.choice([0.0, 0.08, 0.16, 0.24, 1.0, 2.0]) for _ in range(generator.randint(0, 14))]
        outside = _outside_longest_ordered_run(values)
        kept = [value for position, value in enumerate(values) if position not in outside]
        assert kept == sorted(kept)
        assert len(kept) == longest_non_decreasing_length(values)


def longest_non_decreasing_length(values: list[float]) -> int:
    """The O(n^2) dynamic programme of qwen_asr's fix_timestamp, as the reference."""
    lengths = [1] * len(values)
    for later in range(len(values)):
        for earlier in range(later):
            if values[earlier] <= values[later]:
                lengths[later] = max(lengths[later], lengths[earlier] + 1)
    return max(lengths, default=0)


# The plan.


def test_a_window_spans_the_room_between_the_plausible_neighbours_plus_margins() -> None:
    bounds = [(0.0, 1.0), (1.2, 1.2), (1.2, 1.2), (2.0, 2.5)]
    plan = plan_repair(bounds, duration=3.0, step=STEP)

    assert plan.implausible == (range(1, 3),)
    assert plan.windows == (Window(range(1, 3), start=0.84, end=2.16, earliest=1.0, latest=2.0),)


def test_windows_at_the_edges_stop_at_the_audio() -> None:
    bounds = [(0.05, 0.05), (0.3, 0.9), (2.9, 2.9)]
    plan = plan_repair(bounds, duration=3.0, step=STEP)

    assert plan.windows == (
        Window(range(0, 1), start=0.0, end=0.46, earliest=0.0, latest=0.3),
        Window(range(2, 3), start=0.74, end=3.0, earliest=0.9, latest=3.0),
    )


def test_no_window_for_the_whole_job_or_a_span_without_room() -> None:
    # The whole job: its window would be the first pass again.
    everything = plan_repair([(205.44, 205.44), (395.68, 395.68)], duration=3.0, step=STEP)
    assert everything.implausible == (range(0, 2),) and everything.windows == ()
    # Neighbours 40 ms apart: no 80 ms unit fits between them.
    no_room = plan_repair([(0.0, 1.0), (1.0, 1.0), (1.04, 1.5)], duration=2.0, step=STEP)
    assert no_room.implausible == (range(1, 2),) and no_room.windows == ()


def test_at_most_max_repair_spans_windows_per_job() -> None:
    # Each second: a plausible unit, then a zero-length one.
    spans = MAX_REPAIR_SPANS + 3
    bounds = [unit for second in range(spans) for unit in ((second, second + 0.5), (second + 0.7, second + 0.7))]
    plan = plan_repair(bounds, duration=spans, step=STEP)

    assert len(plan.implausible) == spans
    assert [window.units for window in plan.windows] == list(plan.implausible[:MAX_REPAIR_SPANS])


# Repaired timings.


def test_a_plausible_re_alignment_is_kept_flagged_repaired_with_its_confidence() -> None:
    first = raw([(0.0, 1.0), (1.2, 1.2), (1.2, 1.2), (2.0, 2.5)], words=["one", "two", "three", "four"])

    def realign(window: Window, words: tuple[str, ...]) -> RawAlignment:
        assert words == ("two", "three") and (window.start, window.end) == (0.84, 2.16)
        return RawAlignment(words, ((0.24, 0.56), (0.56, 1.12)), (0.7, 0.6))  # window time

    _, timings = repair(first, 3.0, realign)

    assert timings == [
        UnitTiming("one", 0.0, 1.0, 0.9),
        UnitTiming("two", 1.08, 1.4, 0.7, (REPAIRED,)),
        UnitTiming("three", 1.4, 1.96, 0.6, (REPAIRED,)),
        UnitTiming("four", 2.0, 2.5, 0.9),
    ]


def test_a_re_alignment_still_implausible_is_interpolated_by_character_count() -> None:
    first = raw([(0.0, 1.0), (1.2, 1.2), (1.2, 1.2), (2.0, 2.5)], words=["one", "to", "four", "five"])

    def realign(window: Window, words: tuple[str, ...]) -> RawAlignment:
        return RawAlignment(words, ((0.5, 0.5), (0.5, 0.5)), (0.9, 0.9))  # zero length again

    _, timings = repair(first, 3.0, realign)

    # The room 1.0-2.0 s, shared 2:4 by "to" and "four".
    assert timings[1:3] == [
        UnitTiming("to", 1.0, 1.333, 0.0, (INTERPOLATED,)),
        UnitTiming("four", 1.333, 2.0, 0.0, (INTERPOLATED,)),
    ]
    assert timings[0] == UnitTiming("one", 0.0, 1.0, 0.9) and timings[3] == UnitTiming("five", 2.0, 2.5, 0.9)


def test_a_partly_plausible_re_alignment_keeps_the_plausible_units() -> None:
    first = raw([(0.0, 1.0), (1.2, 1.2), (1.2, 1.2), (1.2, 1.2), (2.0, 2.5)])

    def realign(window: Window, words: tuple[str, ...]) -> RawAlignment:
        return RawAlignment(words, ((0.24, 0.4), (0.64, 0.64), (0.8, 1.04)), (0.8, 0.8, 0.5))

    _, timings = repair(first, 3.0, realign)

    assert [timing.flags for timing in timings] == [(), (REPAIRED,), (INTERPOLATED,), (REPAIRED,), ()]
    assert (timings[1].end, timings[3].start) == (1.24, 1.64)
    assert (timings[2].start, timings[2].end) == (1.24, 1.64)  # the room its re-aligned neighbours leave
    assert_well_formed(timings, first, 3.0)


def test_re_aligned_units_in_the_margin_are_not_kept() -> None:
    # Re-aligned into the margin, over the left neighbour: clamped to the room they have no length.
    first = raw([(0.0, 1.0), (1.2, 1.2), (2.0, 2.5)])

    def realign(window: Window, words: tuple[str, ...]) -> RawAlignment:
        return RawAlignment(words, ((0.0, 0.08),), (0.9,))

    _, timings = repair(first, 3.0, realign)

    assert timings[1] == UnitTiming("w1", 1.0, 2.0, 0.0, (INTERPOLATED,))


def test_a_failed_repair_call_interpolates_its_spans() -> None:
    first = raw([(0.0, 1.0), (1.2, 1.2), (2.0, 2.5)])

    _, timings = repair(first, 3.0, lambda window, words: None)

    assert timings[1] == UnitTiming("w1", 1.0, 2.0, 0.0, (INTERPOLATED,))


def test_a_job_with_nothing_plausible_is_interpolated_over_the_whole_audio() -> None:
    first = raw([(205.44, 205.44), (395.68, 395.68), (395.68, 395.68)], words=["a", "bb", "c"])

    plan, timings = repair(first, 2.0, lambda window, words: pytest.fail("the whole job is never re-aligned"))

    assert plan.windows == ()
    assert timings == [
        UnitTiming("a", 0.0, 0.5, 0.0, (INTERPOLATED,)),
        UnitTiming("bb", 0.5, 1.5, 0.0, (INTERPOLATED,)),
        UnitTiming("c", 1.5, 2.0, 0.0, (INTERPOLATED,)),
    ]


def test_plausible_units_are_passed_on_clamped_to_the_audio() -> None:
    first = raw([(0.0, 1.0), (1.0, 2.04)], confidence=0.42)

    _, timings = repair(first, 2.0, lambda window, words: pytest.fail("nothing to repair"))

    assert timings == [UnitTiming("w0", 0.0, 1.0, 0.42), UnitTiming("w1", 1.0, 2.0, 0.42)]


def test_any_raw_output_and_any_re_alignment_give_well_formed_timings() -> None:
    generator = random.Random(7)
    grid = [round(STEP * step, 3) for step in range(60)]  # up to 4.8 s, past the audio's 4 s

    def random_bounds(count: int) -> list[Bounds]:
        return [(generator.choice(grid), generator.choice(grid)) for _ in range(count)]

    def realign(window: Window, words: tuple[str, ...]) -> RawAlignment | None:
        if generator.random() < 0.1:
            return None
        return RawAlignment(words, tuple(random_bounds(len(words))), tuple(generator.random() for _ in words))

    outcomes = set()
    for _ in range(500):
        first = raw(sorted(random_bounds(generator.randint(1, 12))) if generator.random() < 0.5 else random_bounds(
            generator.randint(1, 12)
        ), confidence=generator.random())
        plan, timings = repair(first, 4.0, realign)
        assert_well_formed(timings, first, 4.0)
        implausible = {index for span in plan.implausible for index in span}
        for index, timing in enumerate(timings):
            if index not in implausible:
                assert timing.flags == () and timing.confidence == first.confidences[index]
            else:
                assert timing.flags in ((REPAIRED,), (INTERPOLATED,))
            outcomes.add(timing.flags)
    assert outcomes == {(), (REPAIRED,), (INTERPOLATED,)}  # every path was taken
