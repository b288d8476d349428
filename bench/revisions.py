"""Another commit's code as a server to measure (`seq-cost`): a temporary git worktree of this
repository at that commit, and the environment that makes a server process import the project
from it.

Server processes and `manage.py` start in this checkout (chat.testing starts them there) with
the same interpreter and `.venv`; `code_env` puts the worktree first on their import path and
sets PYTHONSAFEPATH, so neither the working directory (`python -m clarity_project.serve`) nor
the script's directory (`manage.py`) comes before it. `manage.py` itself is this checkout's,
so `checkout` insists it is the same file in both; everything it imports is the worktree's.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from chat.testing.processes import ROOT, server_env


@dataclass(frozen=True)
class Revision:
    commit: str  # full hash
    subject: str
    tree: Path | None  # None: this checkout (with any uncommitted work)
    dirty: bool = False  # this checkout has uncommitted changes to tracked files

    def describe(self) -> str:
        where = "this checkout" + (", with uncommitted changes" if self.dirty else "")
        if self.tree is not None:
            where = "a temporary worktree"
        subject = self.subject if len(self.subject) <= 60 else self.subject[:57] + "..."
        return f"{self.commit[:10]} {subject!r} ({where})"

    def to_json(self) -> dict[str, object]:
        return {"commit": self.commit, "subject": self.subject, "dirty": self.dirty}


def git(*args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def code_env(tree: Path | None) -> dict[str, str | None]:
    """Server environment that runs the project's code from `tree` ({} for this checkout)."""
    if tree is None:
        return {}
    return {"PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}


def current() -> Revision:
    """This checkout: its HEAD, and whether tracked files differ from it."""
    commit, subject = git("log", "-1", "--format=%H%n%s").split("\n", 1)
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return Revision(commit, subject, None, dirty)


@contextlib.contextmanager
def checkout(ref: str, directory: Path) -> Iterator[Revision]:
    """`ref` checked out (detached) in a new worktree under `directory`, removed at the end."""
    commit, subject = git("log", "-1", "--format=%H%n%s", f"{ref}^{{commit}}").split("\n", 1)
    tree = directory / f"tree-{commit[:10]}"
    git("worktree", "add", "--detach", "--quiet", str(tree), commit)
    try:
        if (tree / "manage.py").read_bytes() != (ROOT / "manage.py").read_bytes():
            raise RuntimeError(f"manage.py differs at {commit[:10]}: cannot migrate its database")
        imported = subprocess.run(
            [sys.executable, "-c", "import clarity_project; print(clarity_project.__file__)"],
            cwd=ROOT,
            env=server_env(code_env(tree)),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        if not Path(imported).is_relative_to(tree):
            raise RuntimeError(f"the project was imported from {imported}, not from {tree}")
        yield Revision(commit, subject, tree)
    finally:
        git("worktree", "remove", "--force", str(tree))
