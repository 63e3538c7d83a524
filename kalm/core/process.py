"""A process that dies with its parent (Linux ``PR_SET_PDEATHSIG``), as a call and as an exec wrapper.

torchrun starts its ranks in sessions of their own, so a kill -9 of the launcher (or of ``kalm train``)
would leave them running, still writing checkpoints into the run folder a resumed job then uses. The
training ranks call :func:`die_with_parent`; ``kalm train`` starts its launcher through this module
(``python -m kalm.core.process CMD...``), which sets it in a fresh one-thread process and then execs the
command: the setting survives exec, and no ``preexec_fn`` runs in the (threaded) parent. Stdlib only, so
the wrapper starts fast.
"""

from __future__ import annotations

import os
import sys


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (elsewhere: nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()  # (may be 1 legitimately: a launcher running as a container's init)
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call: nothing would signal us
        os._exit(1)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (owned by anyone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def guarded(cmd: list[str]) -> list[str]:
    """``cmd`` run so that it dies with the process that starts it (Linux; elsewhere ``cmd`` as is)."""
    return [sys.executable, "-m", __name__, *cmd] if sys.platform.startswith("linux") else cmd


if __name__ == "__main__":
    die_with_parent()
    os.execvp(sys.argv[1], sys.argv[1:])
