"""Child processes that never outlive the process that started them."""

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["die_with_parent"]


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn making the child get SIGKILL when its parent dies, where Linux allows it.

    Children run in their own session (so a Ctrl-C at the terminal reaches only the parent, which
    stops them in order); PR_SET_PDEATHSIG is what still ends them if the parent is
    killed outright. SIGKILL rather than SIGTERM because only then is no orphan possible, and
    every store is crash-safe by design. The signal fires when the *thread* that spawned the
    child ends, so start the runner from a thread that outlives the run.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    prctl = ctypes.CDLL(libc_name, use_errno=True).prctl
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec
