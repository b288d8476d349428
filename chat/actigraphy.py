"""Sleep and rest-activity metrics from minute-level activity counts, computed with numpy.

A pure module (no Django), fast enough to run in a worker thread: a week of minute data takes
milliseconds. `analyze_actigraphy` runs an `Analyzer`; `NumpyActigraphyAnalyzer` is the real
one, and the protocol leaves room for a model-based analyzer (the original's PAT transformer).

Input. Points are sorted by time; naive timestamps are UTC. The epoch is the median gap between
distinct timestamps (60 s assumed for a single point). Epochs coarser than one minute are
refused, because Cole-Kripke is defined on one-minute epochs and spreading a five-minute count
over five minutes would invent data. Finer epochs are put on the minute grid: a minute's count
is the mean of its samples times 60 / epoch (the sum, when the minute is complete). Duplicate
timestamps are averaged. Minutes without a sample are *missing*: they are never filled with 0
(which would read as sleep); they are neither sleep nor wake, they are left out of every count
below, and they contribute nothing to the Cole-Kripke window of their neighbours (as the
recording's first four and last two minutes have no neighbours on one side). NaN, infinite and
negative counts are refused, and so is a span over 31 days (at the 10,080-point cap, such a
grid would be more than three quarters gaps).

Sleep/wake: Cole RJ, Kripke DF, Gruen W, Mullaney DJ, Gillin JC. Automatic sleep/wake
identification from wrist activity. Sleep 1992;15(5):461-469. The one-minute-epoch formula

    D = 0.001 * (106 A[-4] + 54 A[-3] + 58 A[-2] + 76 A[-1] + 230 A[0] + 74 A[+1] + 67 A[+2]),

a minute is sleep when D < 1. A[k] is the count k minutes away, scaled as ActiLife (ActiGraph's
software) and the actigraph.sleepr package do: divided by 100 and capped at 300. That is
ActiGraph's adaptation of the formula to its counts (the NHANES scale the original PAT model
was trained on); counts on another scale, such as steps per minute, would need another
divisor (with /100, 100 steps/min gives D = 0.67: sleep). Webster's rescoring rules are not
applied: the main-sleep-period rule below already discards isolated short sleep bouts, and
rules (a) to (c) would turn the first minutes after every awakening into wake by design.
Non-wear is not detected: a device left on a table reads as sleep.

Main sleep period. Sleep bouts (runs of sleep minutes) separated by less than 60 minutes of
wake or missing data are merged into blocks, as the sleep period time window of van Hees VT et
al., Sci Rep 2018;8:12975 merges rest blocks. The main sleep period is the block with the
longest span among those holding persistent sleep (a bout of at least 10 minutes, the "latency
to persistent sleep" convention); ties go to the earliest. With no diary, the block's first
sleep minute stands for the start of the time in bed (lying still awake is indistinguishable
from sleep in counts: Cole-Kripke's known low specificity for wake). Within it:

- sleep onset: the first minute of the first persistent bout;
- sleep_onset_latency: observed minutes from the block start to sleep onset;
- total_sleep_time: sleep minutes from sleep onset to the block end, in hours;
- wake_after_sleep_onset: wake minutes from sleep onset to the block end (the last sleep
  minute, i.e. the final awakening);
- sleep_efficiency: total sleep time / time in bed, where time in bed is the block's observed
  minutes, so time in bed = latency + sleep + WASO.

With multi-day data these describe the single main sleep period of the whole recording, not a
per-night average. A recording that starts or ends asleep truncates that period. With no
persistent sleep anywhere, total_sleep_time is 0 and efficiency, latency and WASO are None.

activity_fragmentation: the sleep-to-wake transition probability per minute over the whole
recording, the rest-to-activity probability kRA of Lim AS, Yu L, Costa MD, et al.,
Quantification of the fragmentation of rest-activity patterns in elderly individuals using a
state transition analysis, Sleep 2011;34(11):1569-1581, with Cole-Kripke sleep as rest. It is
estimated directly as (sleep minutes followed by wake) / (sleep minutes followed by an observed
minute), roughly 1 / the mean sleep bout length; Lim et al. fit the bout survival curve
instead. None when no sleep minute has an observed successor.

Rest-activity rhythm: Van Someren EJW, Swaab DF, Colenda CC, et al. Bright light therapy:
improved sensitivity to its effects on rest-activity rhythms in Alzheimer patients by
application of nonparametric methods. Chronobiol Int 1999;16(4):505-518. Computed on hourly
means over UTC clock hours; an hour needs at least 30 observed minutes, otherwise it is
missing.

- interdaily_stability = N * sum_h (mean_h - mean)^2 / (p * sum_i (x_i - mean)^2), written as
  sum_h n_h (mean_h - mean)^2 / sum_i (x_i - mean)^2 (n_h = hours observed at clock hour h),
  which is Van Someren's formula when every hour of day is equally represented and stays in
  0..1 when a day is partial. None below 48 observed hours: with one day it is 1 by
  construction.
- intradaily_variability = (sum of squared differences between consecutive observed hours /
  their number) / (sum_i (x_i - mean)^2 / N): Van Someren's N * sum / ((N - 1) * sum) when
  nothing is missing. About 0 for a sine wave, about 2 for white noise. None below 24 observed
  hours.
- relative_amplitude = (M10 - L5) / (M10 + L5), M10 and L5 the most active 10 and least active
  5 consecutive hours of the average day (wrapping round midnight). None unless every clock
  hour is observed at least once, or when M10 + L5 is 0 (no activity at all).

IS and IV are None for a flat signal (their variance ratio is 0 / 0); RA is then 0 (no
contrast), or None when everything is zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Protocol

import numpy as np

CK_WEIGHTS = np.array([106.0, 54.0, 58.0, 76.0, 230.0, 74.0, 67.0])  # A[-4] .. A[+2]
CK_BEFORE, CK_AFTER = 4, 2
CK_P = 0.001
CK_COUNT_DIVISOR = 100.0
CK_SCALED_CAP = 300.0

WAKE_BRIDGE_MINUTES = 60
PERSISTENT_SLEEP_MINUTES = 10
MIN_MINUTES_PER_HOUR = 30
MAX_SPAN_MINUTES = 31 * 24 * 60

# Decimal places kept in as_dict: minute resolution for hours, 0.1 minute for minutes.
_ROUNDING = {
    "total_sleep_time": 2,
    "sleep_efficiency": 3,
    "sleep_onset_latency": 1,
    "wake_after_sleep_onset": 1,
    "activity_fragmentation": 4,
    "interdaily_stability": 3,
    "intradaily_variability": 3,
    "relative_amplitude": 3,
}


class ActigraphyError(ValueError):
    """The data points cannot be analysed; the message says why."""


@dataclass(frozen=True)
class DataPoint:
    timestamp: datetime  # naive means UTC
    value: float  # activity count for that epoch


@dataclass(frozen=True)
class ActigraphyMetrics:
    """The analysis result. None means "not defined for this recording" (see the module doc)."""

    points: int
    duration_hours: int
    epoch_seconds: int
    algorithm: str
    total_sleep_time: float  # hours
    sleep_efficiency: float | None  # 0..1
    sleep_onset_latency: float | None  # minutes
    wake_after_sleep_onset: float | None  # minutes
    activity_fragmentation: float | None  # sleep-to-wake transition probability per minute
    interdaily_stability: float | None
    intradaily_variability: float | None
    relative_amplitude: float | None

    def as_dict(self) -> dict:
        data = asdict(self)
        for key, digits in _ROUNDING.items():
            if data[key] is not None:
                data[key] = round(data[key], digits)
        return data


class Analyzer(Protocol):
    name: str

    def analyze(self, *, points: Sequence[DataPoint], steps: float | None) -> ActigraphyMetrics: ...


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.utcoffset() is None else moment


def duration_hours(timestamps: Sequence[datetime]) -> int:
    """The original's rule: whole hours spanned, at least 1; 24 when there is no span."""
    if len(timestamps) == 1:
        return 1
    if not timestamps:
        return 24
    moments = [_as_utc(moment) for moment in timestamps]
    span = (max(moments) - min(moments)).total_seconds()
    return max(1, math.floor(span / 3600)) if span > 0 else 24


def cole_kripke_index(counts: np.ndarray) -> np.ndarray:
    """Cole-Kripke's D for each minute of per-minute counts (missing minutes given as 0).

    Counts beyond either end of the array count as 0. A minute is sleep when D < 1.
    """
    scaled = np.minimum(np.asarray(counts, dtype=float) / CK_COUNT_DIVISOR, CK_SCALED_CAP)
    padded = np.concatenate((np.zeros(CK_BEFORE), scaled, np.zeros(CK_AFTER)))
    return CK_P * np.correlate(padded, CK_WEIGHTS, mode="valid")


@dataclass(frozen=True)
class _MinuteGrid:
    counts: np.ndarray  # per-minute counts, NaN where missing
    start_minute: int  # of counts[0], in minutes since the Unix epoch (UTC)
    epoch_seconds: int


def _minute_grid(points: Sequence[DataPoint]) -> _MinuteGrid:
    if not points:
        raise ActigraphyError("No data points to analyse.")
    seconds = np.array([_as_utc(point.timestamp).timestamp() for point in points])
    try:
        values = np.array([point.value for point in points], dtype=float)
    except (TypeError, ValueError) as exc:
        raise ActigraphyError("Activity values must be numbers.") from exc
    if not np.isfinite(values).all():
        raise ActigraphyError("Activity values must be finite numbers (no NaN or infinity).")
    if (values < 0).any():
        raise ActigraphyError("Activity counts cannot be negative.")

    gaps = np.diff(np.unique(seconds))
    epoch = float(np.median(gaps)) if gaps.size else 60.0
    if round(epoch) > 60:
        raise ActigraphyError(
            f"Data points are {round(epoch)} s apart; minute-level (or finer) activity counts "
            "are needed."
        )
    minutes = np.floor(seconds / 60).astype(np.int64)
    start = int(minutes.min())
    length = int(minutes.max()) - start + 1
    if length > MAX_SPAN_MINUTES:
        raise ActigraphyError(
            f"Data points span more than {MAX_SPAN_MINUTES // 1440} days; send at most a week."
        )
    index = minutes - start
    sums = np.bincount(index, weights=values, minlength=length)
    samples = np.bincount(index, minlength=length)
    with np.errstate(invalid="ignore", divide="ignore"):
        counts = np.where(samples > 0, sums / samples * (60.0 / epoch), np.nan)
    return _MinuteGrid(counts=counts, start_minute=start, epoch_seconds=max(1, round(epoch)))


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) indices of the runs of True in mask."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


@dataclass(frozen=True)
class _SleepPeriod:
    in_bed: int
    latency: int
    asleep: int
    waso: int


def _main_sleep_period(asleep: np.ndarray, observed: np.ndarray) -> _SleepPeriod | None:
    starts, ends = _runs(asleep)
    if not starts.size:
        return None
    opens_block = np.concatenate(([True], starts[1:] - ends[:-1] >= WAKE_BRIDGE_MINUTES))
    block = np.cumsum(opens_block) - 1
    block_starts = starts[opens_block]
    block_ends = ends[np.concatenate((opens_block[1:], [True]))]
    persistent = ends - starts >= PERSISTENT_SLEEP_MINUTES
    holds_persistent = np.bincount(block, weights=persistent, minlength=block_starts.size) > 0
    if not holds_persistent.any():
        return None
    chosen = int(np.argmax(np.where(holds_persistent, block_ends - block_starts, -1)))
    start, end = block_starts[chosen], block_ends[chosen]
    onset = starts[(block == chosen) & persistent][0]
    awake = observed & ~asleep
    return _SleepPeriod(
        in_bed=int(observed[start:end].sum()),
        latency=int(observed[start:onset].sum()),
        asleep=int(asleep[onset:end].sum()),
        waso=int(awake[onset:end].sum()),
    )


def _sleep_to_wake_probability(asleep: np.ndarray, observed: np.ndarray) -> float | None:
    from_sleep = asleep[:-1] & observed[1:]
    if not from_sleep.any():
        return None
    return float((from_sleep & ~asleep[1:]).sum() / from_sleep.sum())


def _hourly_means(grid: _MinuteGrid) -> tuple[np.ndarray, np.ndarray]:
    """Mean count per UTC clock hour (NaN when under-observed), and each hour's hour of day."""
    observed = ~np.isnan(grid.counts)
    hours = (grid.start_minute + np.arange(grid.counts.size)) // 60
    first_hour = int(hours[0])
    index = (hours - first_hour)[observed]
    length = int(hours[-1]) - first_hour + 1
    sums = np.bincount(index, weights=grid.counts[observed], minlength=length)
    minutes = np.bincount(index, minlength=length)
    means = np.where(minutes >= MIN_MINUTES_PER_HOUR, sums / np.maximum(minutes, 1), np.nan)
    return means, (first_hour + np.arange(length)) % 24


@dataclass(frozen=True)
class _Rhythm:
    interdaily_stability: float | None
    intradaily_variability: float | None
    relative_amplitude: float | None


def _circular_window_means(profile: np.ndarray, hours: int) -> np.ndarray:
    wrapped = np.concatenate((profile, profile[: hours - 1]))
    return np.convolve(wrapped, np.full(hours, 1.0 / hours), mode="valid")


def _rhythm(hourly: np.ndarray, hour_of_day: np.ndarray) -> _Rhythm:
    valid = ~np.isnan(hourly)
    values, clock = hourly[valid], hour_of_day[valid]
    if values.size < 24:
        return _Rhythm(None, None, None)
    per_hour = np.bincount(clock, minlength=24)
    profile = np.bincount(clock, weights=values, minlength=24) / np.maximum(per_hour, 1)

    relative_amplitude = None
    if per_hour.all():
        m10 = _circular_window_means(profile, 10).max()
        l5 = _circular_window_means(profile, 5).min()
        if m10 + l5 > 0:
            relative_amplitude = float((m10 - l5) / (m10 + l5))

    if np.allclose(values, values[0]):
        return _Rhythm(None, None, relative_amplitude)
    mean = values.mean()
    total = float(((values - mean) ** 2).sum())
    between = float((per_hour * (profile - mean) ** 2).sum())
    changes = np.diff(hourly)
    changes = changes[~np.isnan(changes)]
    return _Rhythm(
        interdaily_stability=between / total if values.size >= 48 else None,
        intradaily_variability=(
            float((changes**2).mean() / (total / values.size)) if changes.size else None
        ),
        relative_amplitude=relative_amplitude,
    )


class NumpyActigraphyAnalyzer:
    """Cole-Kripke sleep scoring and Van Someren's nonparametric rhythm measures (module doc)."""

    name = "actigraphy-numpy"
    algorithm = "cole-kripke-1992"

    def analyze(self, *, points: Sequence[DataPoint], steps: float | None) -> ActigraphyMetrics:
        """Analyse the points. `steps` is accepted because the original passed it; it is not
        used, since a step total is not an activity count and none of the metrics need it."""
        grid = _minute_grid(points)
        observed = ~np.isnan(grid.counts)
        asleep = observed & (cole_kripke_index(np.where(observed, grid.counts, 0.0)) < 1.0)
        period = _main_sleep_period(asleep, observed)
        rhythm = _rhythm(*_hourly_means(grid))
        return ActigraphyMetrics(
            points=len(points),
            duration_hours=duration_hours([point.timestamp for point in points]),
            epoch_seconds=grid.epoch_seconds,
            algorithm=self.algorithm,
            total_sleep_time=period.asleep / 60 if period else 0.0,
            sleep_efficiency=period.asleep / period.in_bed if period else None,
            sleep_onset_latency=float(period.latency) if period else None,
            wake_after_sleep_onset=float(period.waso) if period else None,
            activity_fragmentation=_sleep_to_wake_probability(asleep, observed),
            interdaily_stability=rhythm.interdaily_stability,
            intradaily_variability=rhythm.intradaily_variability,
            relative_amplitude=rhythm.relative_amplitude,
        )


DEFAULT_ANALYZER: Analyzer = NumpyActigraphyAnalyzer()


def analyze_actigraphy(
    *,
    points: Sequence[DataPoint],
    steps: float | None = None,
    analyzer: Analyzer | None = None,
) -> ActigraphyMetrics:
    """Analyse the points with `analyzer` (default: the numpy analyzer).

    Raises ActigraphyError for input that cannot be analysed.
    """
    return (analyzer or DEFAULT_ANALYZER).analyze(points=points, steps=steps)
