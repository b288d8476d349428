"""Where a worker's health analyses run, and how many it takes on (protocol §16).

`AnalysisPool`: child processes (a `ProcessPoolExecutor`, one per worker process, started on
the first analysis and stopped with the worker) run `chat.analysis_jobs.analysis_job`, so
neither the decoding of a large frame, nor its validation, nor the metrics hold this
process's event loop or its GIL. They are started with `spawn`, not `fork`: this process runs
Twisted, asyncio and threads, whose locks and state a forked copy would inherit mid-use.

`AnalysisQueue`: the analyses one worker has accepted and not finished (waiting for or in an
analysis process, or being narrated), at most CHAT_ANALYSIS_QUEUE; a request beyond it is
refused at once, with nothing queued.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from chat.analysis_jobs import (
    Analysed,
    AnalysisLimits,
    FrameRejected,
    analysis_job,
    analysis_process_init,
)
from chat.metrics import ANALYSES_IN_FLIGHT, ANALYSIS_JOBS

logger = logging.getLogger(__name__)


class AnalysisPool:
    """This worker's analysis processes."""

    def __init__(self, *, processes: int) -> None:
        self.processes = processes
        self._executor: ProcessPoolExecutor | None = None
        self._closed = False

    def executor(self) -> ProcessPoolExecutor:
        """The pool (its processes start as jobs come)."""
        if self._closed:
            raise RuntimeError("the analysis pool is shut down")
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=analysis_process_init,
            )
        return self._executor

    async def run(
        self, text: str, *, user_id: str, limits: AnalysisLimits
    ) -> FrameRejected | Analysed:
        """`analysis_job` in an analysis process; what it raised, if it failed."""
        executor = self.executor()
        try:
            outcome = await asyncio.wrap_future(
                executor.submit(analysis_job, text, user_id=user_id, limits=limits)
            )
        except BrokenProcessPool:
            # A process died (killed, out of memory): the next analysis gets a new pool.
            ANALYSIS_JOBS.labels("failed").inc()
            if self._executor is executor:
                self._executor = None
                executor.shutdown(wait=False, cancel_futures=True)
            raise
        except Exception:
            ANALYSIS_JOBS.labels("failed").inc()
            raise
        ANALYSIS_JOBS.labels("refused" if isinstance(outcome, FrameRejected) else "analysed").inc()
        return outcome

    def shutdown(self) -> None:
        """Stop the processes (running jobs finish in the background; queued ones are
        dropped); no job is taken after this."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


class AnalysisQueue:
    """The analyses accepted on this event loop and not finished."""

    def __init__(self) -> None:
        self.in_flight = 0

    def admit(self, *, capacity: int) -> bool:
        """Take one more analysis, unless `capacity` are in flight already."""
        if self.in_flight >= capacity:
            return False
        self.in_flight += 1
        ANALYSES_IN_FLIGHT.inc()
        return True

    def release(self) -> None:
        self.in_flight -= 1
        ANALYSES_IN_FLIGHT.dec()
