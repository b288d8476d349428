"""One updating status line on stderr while the benchmark runs.

On a terminal the line is rewritten in place; otherwise only finished items are printed (one
line each), so logs stay readable.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.started = time.monotonic()

    def _clock(self) -> str:
        elapsed = int(time.monotonic() - self.started)
        return f"{elapsed // 60:02d}:{elapsed % 60:02d}"

    def update(self, text: str) -> None:
        """Replace the status line (terminal only)."""
        if not self.live:
            return
        width = shutil.get_terminal_size((120, 20)).columns - 1
        self.stream.write("\r\033[K" + f"[{self._clock()}] {text}"[:width])
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line that stays (a finished step, a phase starting)."""
        if self.live:
            self.stream.write("\r\033[K")
        self.stream.write(f"[{self._clock()}] {text}\n")
        self.stream.flush()
