"""The rate limiter's rule arithmetic, on both shared-state backends: this process's memory
and Redis (its one-script round trip), when Redis runs on 127.0.0.1:6379."""

import pytest

from chat.ratelimit import Rule, rate_limit_hit
from tests.conftest import use_backend


@pytest.fixture(autouse=True, params=["memory", "redis"])
def state(request, settings):
    backend = use_backend(request.param, settings)
    yield backend
    backend.clear()


RULE = Rule(seconds=60, max_requests=60, close_factor=3)
START = 6_000_000.0  # the start of a window (a multiple of 60)


async def hits(n: int, *, at: float, key: str = "u", rule: Rule = RULE):
    return [await rate_limit_hit(key=key, rule=rule, now=at) for _ in range(n)]


async def test_up_to_the_limit_passes_then_it_is_refused():
    assert not any(v.limited for v in await hits(60, at=START + 1))
    verdict = await rate_limit_hit(key="u", rule=RULE, now=START + 1)
    assert verdict.limited and not verdict.abusive
    assert verdict.retry_after == 60  # the window must end and its weight decay by 1/60


async def test_keys_are_independent():
    await hits(60, at=START + 1)
    assert not (await rate_limit_hit(key="someone-else", rule=RULE, now=START + 1)).limited


async def test_refused_frames_do_not_use_up_the_allowance():
    await hits(60, at=START + 1)
    await hits(50, at=START + 2)  # refused
    # one window later, only the 60 accepted frames weigh (60 * 59/60 = 59): one fits
    assert not (await rate_limit_hit(key="u", rule=RULE, now=START + 61)).limited
    assert (await rate_limit_hit(key="u", rule=RULE, now=START + 61)).limited


async def test_rolling_window_weighs_the_previous_window():
    await hits(60, at=START + 59)
    # half-way through the next window, half of the previous one still counts
    results = await hits(31, at=START + 90)
    assert [v.limited for v in results] == [False] * 30 + [True]


async def test_retry_after_within_the_window_when_the_previous_one_is_decaying():
    await hits(60, at=START + 59)
    await hits(30, at=START + 90)
    verdict = await rate_limit_hit(key="u", rule=RULE, now=START + 90)
    assert verdict.limited
    # 60 * (1 - (t - 60) / 60) + 30 + 1 <= 60  ->  t >= 61 -> 1 s after START + 90
    assert verdict.retry_after == 1
    assert not (await rate_limit_hit(key="u", rule=RULE, now=START + 91)).limited


async def test_more_than_three_times_the_limit_in_a_window_is_abuse():
    verdicts = await hits(181, at=START + 1)
    assert [v.abusive for v in verdicts].index(True) == 180
    assert all(v.limited for v in verdicts[60:])


@pytest.mark.parametrize("limit", [1, 4, 60])
async def test_retry_after_is_honest(limit):
    rule = Rule(seconds=60, max_requests=limit)
    await hits(limit, at=START + 10, rule=rule)
    verdict = await rate_limit_hit(key="u", rule=rule, now=START + 10)
    assert verdict.limited
    later = START + 10 + verdict.retry_after
    assert not (await rate_limit_hit(key="u", rule=rule, now=later)).limited


async def test_a_burst_straddling_two_windows_is_still_abuse():
    """The abuse threshold weighs the previous window as the limit does: a hostile burst
    that starts just before a window's end is closed at the same frame as one that does not
    (with fixed windows it was never closed: each window saw less than three times the
    limit)."""
    before = await hits(40, at=START + 59.9)  # 40 accepted in the first window
    after = await hits(141, at=START + 60.1)  # 20 accepted, then refused, in the next
    assert not any(v.limited for v in before)
    assert [v.limited for v in after[:21]] == [False] * 20 + [True]
    # 40 * (1 - 0.1/60) + 141 frames > 180 from the 141st frame of the next window on
    assert [v.abusive for v in after].index(True) == 140


async def test_refused_frames_of_the_previous_window_weigh_toward_abuse():
    await hits(180, at=START + 30)  # 60 accepted, 120 refused: not yet abuse
    verdicts = await hits(40, at=START + 90)  # half of those 180 still weigh
    # 180 * 0.5 = 90 weigh: 91 more frames would be abuse, not 40
    assert not any(v.abusive for v in verdicts)
    assert (await hits(52, at=START + 90))[-1].abusive
