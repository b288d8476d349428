"""This process's identity among the workers sharing the database and Redis."""

import os
import socket
import uuid

# Fixed for the life of the process: sessions record it, so the sessions of a worker that
# died without cleaning up can be found and ended by the others.
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
