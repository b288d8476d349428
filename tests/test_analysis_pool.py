"""The analysis processes (chat/analysis_pool.py, chat/analysis_jobs.py): jobs run in a real
spawned child, which imports no Django; a dead child costs one analysis, not the pool; and the
children end with their worker, however it ends (real daphne workers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures.process import BrokenProcessPool

import pytest

from chat.analysis_jobs import Analysed, AnalysisLimits, FrameRejected
from chat.analysis_pool import AnalysisPool
from chat.protocol import CHAT_LARGE_TYPES, ErrorCode
from chat.testing.client import ChatSocket
from chat.testing.processes import alive, child_pids
from chat.testing.waiting import wait_until
from tests.servers import run_workers
from tests.test_analysis import day_of_minutes

LIMITS = AnalysisLimits(types=CHAT_LARGE_TYPES, max_message_size=65536, max_points=10080)
DAY = json.dumps({"type": "health_insight", "content": {"data_points": day_of_minutes()}})


@pytest.fixture
async def pool():
    pool = AnalysisPool(processes=1)
    yield pool
    pool.shutdown()


def test_the_analysis_module_imports_no_django():
    """What a spawned child imports to run a job: the protocol's schemas and the analyzer."""
    code = (
        "import sys, chat.analysis_jobs; "
        "print(sorted(m for m in sys.modules if m.startswith(('chat', 'django', 'channels'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "['chat', 'chat.actigraphy', 'chat.analysis_jobs', 'chat.protocol']"


async def test_a_job_runs_in_a_spawned_process(pool):
    outcome = await pool.run(DAY, user_id="alice", limits=LIMITS)
    assert isinstance(outcome, Analysed) and outcome.points == 1440
    assert 7.5 <= outcome.metrics["total_sleep_time"] <= 8.2
    [child] = pool.executor()._processes.values()
    assert child.pid != os.getpid() and child._start_method == "spawn"

    refused = await pool.run('{"type": "health_insight"', user_id="alice", limits=LIMITS)
    assert refused == FrameRejected(code=ErrorCode.INVALID_JSON)


async def test_a_dead_analysis_process_costs_one_analysis_not_the_pool(pool):
    await pool.run(DAY, user_id="alice", limits=LIMITS)
    [child] = pool.executor()._processes.values()
    os.kill(child.pid, signal.SIGKILL)
    with pytest.raises(BrokenProcessPool):
        await pool.run(DAY, user_id="alice", limits=LIMITS)
    assert isinstance(await pool.run(DAY, user_id="alice", limits=LIMITS), Analysed)


async def analyse_once(url: str) -> None:
    client = await ChatSocket.join(url, "pool", "alice")
    await client.send_raw(DAY, observed={"data_points": day_of_minutes()})
    while True:
        frame = await client.recv(timeout=20)
        if frame["type"] == "analysis_update" and frame["status"] == "completed":
            break
    await client.close()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
async def test_the_analysis_processes_end_with_their_worker(tmp_path, how):
    """Stopped with the worker (SIGTERM), or by themselves when it dies without stopping them
    (SIGKILL, out of memory): no analysis process outlives its worker."""
    with run_workers(tmp_path, count=1) as (worker,):
        assert child_pids(worker.pid) == set()  # started on the first analysis, not before
        await analyse_once(worker.url)
        children = child_pids(worker.pid)
        assert children, "no analysis process"
        code = worker.stop(how, timeout=15)
        assert code == (0 if how == signal.SIGTERM else -signal.SIGKILL), worker.logs()
        wait_until(
            lambda: not any(alive(pid) for pid in children),
            timeout=10,
            what=f"the worker's children {children} end",
        )
