"""Actigraphy metrics on synthetic recordings whose answers are known by construction.

Cole-Kripke edge effects, used below: counts are divided by 100 before the weights apply, so
300 counts/min (3 scaled) never tips a neighbouring quiet minute into wake (at most
0.001 * 3 * (106 + 54 + 58 + 76) = 0.88 < 1), while 2000 or 3000 counts/min do: the 4 minutes
after and the 2 minutes before such activity are scored wake (the window is A[-4] .. A[+2]).
"""

import json
import math
import random
import time
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest

from chat.actigraphy import (
    ActigraphyError,
    ActigraphyMetrics,
    DataPoint,
    NumpyActigraphyAnalyzer,
    analyze_actigraphy,
    cole_kripke_index,
    duration_hours,
)

NOON = datetime(2025, 6, 1, 12, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def recording(values, *, start=NOON, epoch=MINUTE) -> list[DataPoint]:
    return [DataPoint(start + i * epoch, float(value)) for i, value in enumerate(values)]


def clock(minutes: int) -> tuple[np.ndarray, np.ndarray]:
    """Hour of day and minute of hour of each minute of a recording starting at NOON."""
    minute_of_day = (NOON.hour * 60 + np.arange(minutes)) % 1440
    return minute_of_day // 60, minute_of_day % 60


def nights(days: int = 1, *, day_count: float = 300.0) -> np.ndarray:
    """Noon-to-noon days: still (0) from 23:00 to 07:00, day_count counts/min otherwise."""
    hour, _ = clock(days * 1440)
    return np.where((hour >= 23) | (hour < 7), 0.0, day_count)


def analyze(values, **kwargs) -> ActigraphyMetrics:
    return analyze_actigraphy(points=recording(values, **kwargs))


# duration_hours: the original's rule


@pytest.mark.parametrize(
    ("timestamps", "expected"),
    [
        ([NOON + i * MINUTE for i in range(1440)], 23),
        ([NOON, NOON + timedelta(hours=2)], 2),
        ([NOON], 1),
        ([], 24),
        ([NOON, NOON, NOON], 24),
        ([NOON, NOON + timedelta(minutes=30)], 1),
        ([NOON + timedelta(hours=5), NOON], 5),
    ],
    ids=["1440-minutes", "2h-apart", "one-point", "no-points", "zero-span", "under-1h", "unsorted"],
)
def test_duration_hours_follows_the_original(timestamps, expected):
    assert duration_hours(timestamps) == expected


def test_duration_hours_reads_naive_timestamps_as_utc_when_mixed_with_aware_ones():
    naive = datetime(2025, 6, 1, 10, 0)
    plus_two = timezone(timedelta(hours=2))
    assert duration_hours([naive, datetime(2025, 6, 1, 14, 0, tzinfo=plus_two)]) == 2
    assert duration_hours([naive, datetime(2025, 6, 1, 13, 0, tzinfo=UTC)]) == 3


# Cole-Kripke scoring


def test_cole_kripke_index_matches_the_formula_by_hand():
    # Scaled (/100, capped at 300): [0, 0, 0, 0, 10, 0, 0, 5, 300, 0].
    counts = np.array([0, 0, 0, 0, 1000, 0, 0, 500, 40000, 0])
    expected = 0.001 * np.array(
        [
            0,
            0,
            67 * 10,  # A[+2] = 10
            74 * 10,  # A[+1] = 10
            230 * 10,
            76 * 10 + 67 * 5,
            58 * 10 + 74 * 5 + 67 * 300,
            54 * 10 + 230 * 5 + 74 * 300,
            106 * 10 + 76 * 5 + 230 * 300,
            58 * 5 + 76 * 300,
        ]
    )
    index = cole_kripke_index(counts)
    np.testing.assert_allclose(index, expected, rtol=0, atol=1e-12)
    assert list(index < 1) == [True] * 4 + [False] * 6  # D = 1.095 at minute 5 is wake


# The main sleep period


@pytest.mark.parametrize(
    ("day_count", "sleep_minutes"),
    [(300, 480), (3000, 480 - 4 - 2)],  # see the module docstring for the edge effect
)
def test_a_clean_night(day_count, sleep_minutes):
    metrics = analyze(nights(day_count=day_count))
    assert metrics.total_sleep_time == pytest.approx(sleep_minutes / 60)
    assert metrics.sleep_efficiency == 1.0
    assert metrics.sleep_onset_latency == 0.0
    assert metrics.wake_after_sleep_onset == 0.0
    assert metrics.algorithm == "cole-kripke-1992"
    assert (metrics.points, metrics.duration_hours, metrics.epoch_seconds) == (1440, 23, 60)


def test_a_fragmented_night_has_waso_lower_efficiency_and_more_fragmentation():
    values = nights()
    hour, minute = clock(values.size)
    awakenings = (hour < 7) & (minute < 10)  # 00:00-00:10, 01:00-01:10, ... 06:00-06:10
    values[awakenings] = 2000
    metrics = analyze(values)

    true_waso = 7 * 10
    # Each awakening is scored 2 minutes early and 4 minutes late (window edge effect).
    assert metrics.wake_after_sleep_onset == true_waso + 7 * (2 + 4)
    assert metrics.sleep_onset_latency == 0.0
    assert metrics.total_sleep_time == pytest.approx((480 - 112) / 60)
    assert metrics.sleep_efficiency == pytest.approx((480 - 112) / 480)
    clean = analyze(nights())
    assert metrics.activity_fragmentation == pytest.approx(8 / (480 - 112))
    assert clean.activity_fragmentation == pytest.approx(1 / 480)  # waking at 07:00


def test_latency_runs_to_the_first_persistent_sleep_bout():
    values = nights()
    hour, minute = clock(values.size)
    values[(hour == 23) & (minute >= 5) & (minute < 25)] = 2000  # tossing 23:05-23:25
    metrics = analyze(values)
    # 23:00-23:03 asleep (3 minutes, not persistent), wake 23:03-23:29 (edges included),
    # then asleep until 07:00: the in-bed period starts at 23:00, onset is 23:29.
    assert metrics.sleep_onset_latency == 29.0
    assert metrics.total_sleep_time == pytest.approx((480 - 29) / 60)
    assert metrics.wake_after_sleep_onset == 0.0
    assert metrics.sleep_efficiency == pytest.approx((480 - 29) / 480)


def test_missing_minutes_are_left_out_and_short_gaps_do_not_split_the_night():
    values = nights()
    hour, minute = clock(values.size)
    kept = ~((hour == 2) & (minute < 30))  # device off 02:00-02:30
    points = [p for p, keep in zip(recording(values), kept, strict=True) if keep]
    metrics = analyze_actigraphy(points=points)
    assert metrics.total_sleep_time == pytest.approx(7.5)
    assert metrics.sleep_efficiency == 1.0
    assert metrics.wake_after_sleep_onset == 0.0


def test_a_gap_of_an_hour_or_more_splits_the_night():
    values = nights()
    hour, _ = clock(values.size)
    kept = ~np.isin(hour, [1, 2])  # device off 01:00-03:00
    points = [p for p, keep in zip(recording(values), kept, strict=True) if keep]
    # 23:00-01:00 and 03:00-07:00 are separate periods; the longer one is the main one.
    assert analyze_actigraphy(points=points).total_sleep_time == pytest.approx(4.0)


# Flat signals


def test_constant_activity_has_no_sleep_and_no_rhythm():
    metrics = analyze(np.full(2 * 1440, 300.0))
    assert metrics.total_sleep_time == 0.0
    assert metrics.sleep_efficiency is None
    assert metrics.sleep_onset_latency is None
    assert metrics.wake_after_sleep_onset is None
    assert metrics.activity_fragmentation is None
    assert metrics.interdaily_stability is None
    assert metrics.intradaily_variability is None
    assert metrics.relative_amplitude == 0.0


def test_all_zeros_read_as_one_long_sleep():
    metrics = analyze(np.zeros(2 * 1440))
    assert metrics.total_sleep_time == 48.0
    assert metrics.sleep_efficiency == 1.0
    assert metrics.sleep_onset_latency == 0.0
    assert metrics.wake_after_sleep_onset == 0.0
    assert metrics.activity_fragmentation == 0.0
    assert metrics.interdaily_stability is None
    assert metrics.intradaily_variability is None
    assert metrics.relative_amplitude is None


# Rest-activity rhythm (Van Someren 1999)


def test_identical_days_are_perfectly_stable():
    metrics = analyze(nights(days=7))
    assert metrics.interdaily_stability == pytest.approx(1.0)
    # Hourly series: 168 values, 14 jumps of 300 over 167 consecutive pairs; variance 20000.
    assert metrics.intradaily_variability == pytest.approx(14 * 300**2 / 167 / 20_000)
    assert metrics.relative_amplitude == 1.0  # L5 = 0


def test_a_sine_wave_has_the_analytic_intradaily_variability():
    minutes = np.arange(7 * 1440)
    metrics = analyze(1000 + 900 * np.sin(2 * np.pi * minutes / 1440))
    assert metrics.interdaily_stability == pytest.approx(1.0)
    # For a sinusoid sampled p times a cycle, IV = 4 sin^2(pi / p): 0.068 for hourly data.
    assert metrics.intradaily_variability == pytest.approx(4 * math.sin(math.pi / 24) ** 2, 0.05)


def test_white_noise_is_unstable_with_iv_near_2():
    noise = np.random.default_rng(7).normal(1000, 100, 28 * 1440)
    metrics = analyze(noise)
    # For white noise IS is about (p - 1) / (N - 1) = 23 / 671 = 0.034, and IV about 2.
    assert metrics.interdaily_stability < 0.1
    assert metrics.intradaily_variability == pytest.approx(2.0, abs=0.2)


def test_one_day_has_no_interdaily_stability():
    metrics = analyze(nights())
    assert metrics.interdaily_stability is None
    assert metrics.intradaily_variability == pytest.approx(2 * 300**2 / 23 / 20_000)
    assert metrics.relative_amplitude == 1.0


# Input handling


@pytest.mark.parametrize(
    "points",
    [
        [],
        recording([0, float("nan"), 0]),
        recording([0, float("inf"), 0]),
        recording([0, -1, 0]),
        recording([0, 0], epoch=timedelta(hours=2)),
        [
            DataPoint(NOON, 0.0),
            DataPoint(NOON + MINUTE, 0.0),
            DataPoint(NOON + 40 * 24 * 60 * MINUTE, 0.0),
        ],
    ],
    ids=["empty", "nan", "inf", "negative", "coarser-than-a-minute", "span-over-31-days"],
)
def test_unanalysable_input_is_refused(points):
    with pytest.raises(ActigraphyError):
        analyze_actigraphy(points=points)


def test_a_single_point_does_not_crash():
    metrics = analyze([120])
    assert (metrics.points, metrics.duration_hours, metrics.epoch_seconds) == (1, 1, 60)
    assert metrics.total_sleep_time == 0.0
    assert metrics.sleep_efficiency is None


def test_order_and_timezone_form_do_not_change_the_result():
    points = recording(nights(days=2))
    expected = analyze_actigraphy(points=points)
    shuffled = random.Random(3).sample(points, len(points))
    mixed = [
        DataPoint(p.timestamp.replace(tzinfo=None), p.value) if i % 2 else p
        for i, p in enumerate(shuffled)
    ]
    assert analyze_actigraphy(points=mixed) == expected


def test_sub_minute_epochs_are_summed_into_minutes():
    per_minute = analyze(nights(days=2))
    per_half_minute = analyze(np.repeat(nights(days=2), 2) / 2, epoch=timedelta(seconds=30))
    assert per_half_minute.epoch_seconds == 30
    assert per_half_minute.points == 2 * per_minute.points
    for field in ("total_sleep_time", "sleep_efficiency", "interdaily_stability"):
        assert getattr(per_half_minute, field) == pytest.approx(getattr(per_minute, field))


def test_a_week_of_minutes_analyses_well_under_a_second():
    values = nights(days=7) + np.random.default_rng(1).poisson(5, 7 * 1440)
    points = recording(values)
    assert len(points) == 10_080
    began = time.perf_counter()
    metrics = analyze_actigraphy(points=points, steps=8000)
    assert time.perf_counter() - began < 1.0
    assert metrics.duration_hours == 167
    assert metrics.interdaily_stability > 0.9


def test_steps_do_not_change_the_metrics():
    points = recording(nights())
    assert analyze_actigraphy(points=points, steps=12_000) == analyze_actigraphy(points=points)


def test_as_dict_is_json_safe_rounded_and_keeps_none():
    data = analyze(nights()).as_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["interdaily_stability"] is None
    assert data["activity_fragmentation"] == round(1 / 480, 4)
    assert data["intradaily_variability"] == 0.391


def test_another_analyzer_can_be_plugged_in():
    class Recorder:
        name = "recorder"

        def __init__(self):
            self.calls = []

        def analyze(self, *, points, steps):
            self.calls.append((points, steps))
            return NumpyActigraphyAnalyzer().analyze(points=points, steps=steps)

    recorder = Recorder()
    points = recording([0, 0, 0])
    analyze_actigraphy(points=points, steps=10.0, analyzer=recorder)
    assert recorder.calls == [(points, 10.0)]
