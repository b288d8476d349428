"""One worker on the embedded default (chat/embedded.py), against real daphne workers: a
second worker without REDIS_URL on the same SQLite file refuses to start, saying why, and
leaves the first one's sockets alone; once the first is killed (SIGKILL: nothing cleaned up)
a new worker starts on the same file and ends the sessions the dead one left open;
`manage.py` commands run beside a serving worker; with REDIS_URL several workers share the
file as before. In process: the lock itself (one file whatever the path to it, free again
once its holder lets go; no lock with Redis or without a SQLite file).

Without the lock, the second worker took the first for dead within CHAT_WORKER_TTL +
CHAT_REAP_INTERVAL (it cannot see a liveness key in another process's memory) and ended its
sessions (`worker_lost`), announcing its users as gone."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from chat.embedded import WorkerAlreadyServing, embedded_lock_acquire
from chat.testing.client import ChatSocket
from chat.testing.cluster import Cluster, cluster_start
from chat.testing.processes import HOST, Worker, answers, free_ports, manage, worker_start
from chat.testing.redis_server import REDIS_URL, redis_answers
from chat.testing.waiting import eventually
from tests.servers import CLUSTER_ENV, REAP_INTERVAL, WORKER_TTL, start_cluster

REFUSAL = "refusing to start"


def another_worker(cluster: Cluster, label: str) -> Worker:
    """One more worker on the cluster's database and environment (stopped with the cluster)."""
    worker = worker_start(
        index=len(cluster.workers),
        port=free_ports(1)[0],
        env=cluster.env,
        log_dir=Path(cluster.workers[0].stderr_path).parent,
        label=label,
    )
    cluster.workers.append(worker)
    return worker


def listening_or_exited(worker: Worker) -> str | None:
    if not worker.alive():
        return "exited"
    return "listening" if answers(HOST, worker.port, 0.5) else None


def refusals(worker: Worker) -> list[dict]:
    return [
        record
        for record in worker.log_records()
        if record["level"] == "ERROR" and REFUSAL in record["message"]
    ]


async def test_a_second_worker_on_the_same_sqlite_file_refuses_and_the_first_serves_on(tmp_path):
    with cluster_start(directory=tmp_path, env=CLUSTER_ENV, count=1) as cluster:
        first = cluster.a
        alice = await ChatSocket.join(first.url, "embedded", "alice")
        bob = await ChatSocket.join(first.url, "embedded", "bob")
        await alice.recv_type("user_joined")

        second = another_worker(cluster, "second.")
        if (
            await eventually(
                lambda: listening_or_exited(second), timeout=20, what="the second worker's start"
            )
            == "listening"
        ):
            # As a load balancer's probe would: the first request starts its housekeeping.
            with urllib.request.urlopen(f"{second.http_url}/healthz", timeout=5):
                pass
            await eventually(
                lambda: len(cluster.database.open_sessions()) < 2,
                timeout=WORKER_TTL + 4 * REAP_INTERVAL,
                what="the second worker serving beside the first ends the first's sessions",
            )
            pytest.fail(
                "the second worker serves beside the first and ended its sessions: open now "
                f"{cluster.database.open_sessions()}\n{cluster.logs()}"
            )
        assert second.process.poll() == 1, cluster.logs()
        (refusal,) = refusals(second)
        database = cluster.database.path.resolve()
        # What, where, why and what to do.
        assert f"{database}-worker.lock" in refusal["message"], refusal
        assert str(database) in refusal["message"]
        assert "REDIS_URL" in refusal["message"]

        # The first worker's sockets were left alone: still open, still chatting.
        await alice.send({"type": "message", "content": "still here"})
        assert (await alice.recv_type("message"))["content"] == "still here"
        assert (await bob.recv_type("message"))["content"] == "still here"
        await alice.barrier()
        await bob.barrier()
        assert len(cluster.database.open_sessions()) == 2
        assert not refusals(first)
        cluster.assert_alive([first])

        # manage.py commands take no lock: they run beside the serving worker.
        manage(
            ["createroom", "beside", "--kind", "public", "--name", "Beside"],
            env=cluster.env,
            log_path=tmp_path / "createroom.log",
        )

        # A crash releases the lock: the next worker starts on the same file and ends the
        # sessions the dead one left open.
        first.kill()
        third = another_worker(cluster, "third.")
        third.wait_listening(20)
        carol = await ChatSocket.join(third.url, "embedded", "carol")
        # Its first request started its housekeeping, which finds the dead worker's sessions.
        timeout = WORKER_TTL + 4 * REAP_INTERVAL
        left = [(await carol.recv_type("user_left", timeout))["user_id"] for _ in range(2)]
        assert sorted(left) == ["alice", "bob"]
        assert [user for _, user, _ in cluster.database.open_sessions()] == ["carol"]
        await carol.send({"type": "message", "content": "after the crash"})
        assert (await carol.recv_type("message"))["content"] == "after the crash"
        await carol.close()
        await alice.close()
        await bob.close()
        assert not refusals(third)
        cluster.assert_alive([third])


@pytest.mark.skipif(not redis_answers(REDIS_URL), reason=f"no Redis at {REDIS_URL}")
async def test_with_redis_several_workers_share_one_sqlite_file(tmp_path):
    with start_cluster(tmp_path, backend="sqlite", redis_url=REDIS_URL, count=2) as cluster:
        alice = await ChatSocket.join(cluster.a.url, "shared-file", "alice")
        bob = await ChatSocket.join(cluster.b.url, "shared-file", "bob")
        await alice.recv_type("user_joined")
        await bob.send({"type": "message", "content": "across workers"})
        assert (await alice.recv_type("message"))["content"] == "across workers"
        await alice.close()
        await bob.close()
        cluster.assert_alive()
        assert not refusals(cluster.a) and not refusals(cluster.b)


SQLITE = "django.db.backends.sqlite3"


def test_two_paths_to_one_file_take_one_lock_until_its_holder_lets_go(tmp_path):
    """flock locks belong to an open file, not a process: one process shows the rule."""
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    first = embedded_lock_acquire(
        database={"ENGINE": SQLITE, "NAME": str(tmp_path / "data" / "chat.sqlite3")}, redis_url=""
    )
    assert first is not None
    through_the_link = {"ENGINE": SQLITE, "NAME": str(tmp_path / "link" / "chat.sqlite3")}
    with pytest.raises(WorkerAlreadyServing) as refused:
        embedded_lock_acquire(database=through_the_link, redis_url="")
    assert f"{tmp_path / 'data' / 'chat.sqlite3'}-worker.lock" in str(refused.value)
    first.close()
    again = embedded_lock_acquire(database=through_the_link, redis_url="")
    assert again is not None
    again.close()


@pytest.mark.parametrize(
    ("database", "redis_url"),
    [
        ({"ENGINE": SQLITE, "NAME": "chat.sqlite3"}, "redis://127.0.0.1:6379/0"),
        ({"ENGINE": SQLITE, "NAME": ":memory:"}, ""),
        ({"ENGINE": "django.db.backends.postgresql", "NAME": "clarity"}, ""),
    ],
)
def test_no_lock_with_redis_or_without_a_sqlite_file(database, redis_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert embedded_lock_acquire(database=database, redis_url=redis_url) is None
    assert list(tmp_path.iterdir()) == []
