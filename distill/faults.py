"""Named failpoints: where the fault tests kill the process, deterministically.

Why in the product code: "kill -9 during training" is only testable reliably if the
test can choose the moment; timing a signal from outside lands anywhere or nowhere on
a fast fake run. ``failpoint(name)`` does nothing unless the environment variable
``DISTILL_FAILPOINT`` names that point (tests set it on a child process); then the
process kills itself with SIGKILL, exactly as the operating system's OOM killer or a
preempted machine would, with no chance to clean up.
"""

from __future__ import annotations

import os
import signal

ENV = "DISTILL_FAILPOINT"


def failpoint(name: str) -> None:
    """SIGKILL this process here if $DISTILL_FAILPOINT is ``name``."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
