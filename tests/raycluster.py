"""A real Ray cluster on this machine for tests: ``ray start --head`` with its own temp dir, auth token
and port, two CPUs (two worker processes); stopped by killing only the processes it started (``ray stop``
would stop every Ray on the machine)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RAY = Path(sys.executable).parent / "ray"
# one token for every cluster of this test process: a Ray driver keeps the first token it read, so a
# second cluster with a new token would refuse the same process's next ray.init
_TOKEN = secrets.token_hex(32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def ray_cluster(tmp: Path, cpus: int = 2) -> Iterator[str]:
    """Yield the address (``127.0.0.1:PORT``) of a fresh head node; the env of this process gets the
    cluster's token so drivers started from it can join."""
    import psutil

    tmp.mkdir(parents=True, exist_ok=True)
    token = tmp / "token"
    token.write_text(_TOKEN)
    port = _free_port()
    env_add = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    old = {k: os.environ.get(k) for k in env_add}
    os.environ.update(env_add)
    cmd = [
        str(RAY),
        "start",
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus}",
        "--include-dashboard=false",
        f"--temp-dir={tmp}",
        "--disable-usage-stats",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        mine = [
            p
            for p in psutil.process_iter(["cmdline"])
            if any(str(tmp) in a or f":{port}" in a for a in (p.info["cmdline"] or []))
        ]
        procs = {p.pid: p for p in mine}
        for p in mine:
            with contextlib.suppress(psutil.NoSuchProcess):
                procs.update({c.pid: c for c in p.children(recursive=True)})
        for p in procs.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(list(procs.values()), timeout=10)
        time.sleep(0.5)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
