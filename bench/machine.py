"""What the figures were measured on: CPU, memory, versions (recorded with every run)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess

import psutil

from bench.servers import REDIS_URL
from chat.testing.processes import ROOT

PACKAGES = ("Django", "channels", "daphne", "Twisted", "channels-redis", "redis", "websockets")


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def redis_version() -> str:
    try:
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        with contextlib.closing(client):
            return str(client.info("server")["redis_version"])
    except Exception:
        return "unreachable"


def git_commit() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except OSError:
        return "unknown"
    return result.stdout.strip() or "unknown"


def machine_info() -> dict[str, object]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis_server": redis_version(),
        "packages": versions,
        "commit": git_commit(),
    }
