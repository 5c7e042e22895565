"""Signal set-up for tests that send Ctrl-C (SIGINT) to a child process."""

from __future__ import annotations

import signal


def default_sigint() -> None:
    """Give this (child) process the default SIGINT disposition; pass as ``preexec_fn``.

    A job started in the background by a non-interactive shell (``cmd &`` in a script, as CI
    runners and ``nohup`` wrappers do) inherits SIGINT *ignored*, and Python then never installs
    its KeyboardInterrupt handler: a test of Ctrl-C would see the signal vanish. The tests are
    about what llmc does with Ctrl-C, so the child starts as a terminal's child would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
