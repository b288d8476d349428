"""Test support shared by the test suite (tests/) and the load benchmark (bench/), as
`channels.testing` serves Channels' own tests and its users.

- `clock.py`: a clock that moves only when told to (the socket timers in unit tests).
- `waiting.py`: the one way to wait for something: poll a condition until a deadline.
- `processes.py`: server processes on free loopback ports: their environment, start, wait until
  listening, stop (SIGTERM, then SIGKILL), `manage.py` commands, log tails and metrics.
- `databases.py`: fresh SQLite and PostgreSQL databases (empty, or copies of a migrated
  template), read directly, and their removal.
- `redis_server.py`: Redis key prefixes of a run and their deletion; a private redis-server
  that a test may stop, stall and restart.
- `cluster.py`: workers sharing one fresh database and one Redis key prefix, started and
  cleaned up together.
- `client.py`: a v1-protocol WebSocket client with bounded waits, emulator tokens, HTTP calls.
"""
