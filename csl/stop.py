"""A stop asked for by Ctrl-C or SIGTERM, honoured where the training state is whole.

``csl train`` / ``csl demo`` install :func:`handle_signal` for SIGINT and SIGTERM. Inside :func:`deferred` (the
trainer's step loop) the first signal only records the request: the trainer finishes the iteration, saves
``latest.pt`` and then raises (:func:`raise_requested`), so at most one iteration is lost. Anywhere else (set-up, an
evaluation, whose own stop path saves the epoch), and for a second signal, it raises at once. A stop raised at once
that never leaves its block (Python drops an exception raised in an at-fork callback, e.g. while a DataLoader starts
its workers: "Exception ignored ...") is raised again when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's stop or preemption): handled as Ctrl-C, so the run folder's lock is released
    and the training so far is saved."""


_requested: int | None = None  # the signal that asked for the stop
_deferring = False
_depth = 0  # how many blocks (deferred / immediate) are open
_raised: int | None = None  # a signal raised at once inside a block whose exception has not yet been seen leaving it


def _exception(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def handle_signal(signum: int, frame) -> None:
    global _requested, _raised
    if not _deferring or _requested is not None:
        _requested = None  # raised now: nothing is left pending for a later run in this process
        _raised = signum if _depth else None
        raise _exception(signum)
    _requested = signum
    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    # os.write, not print: a handler that interrupts a write to stderr (a progress bar, a log line) must not write
    # through the same buffered stream.
    os.write(2, f"\ncsl: {name}: stopping after this iteration with latest.pt saved (Ctrl-C again stops at "
                f"once)\n".encode())


@contextlib.contextmanager
def deferred(enabled: bool = True) -> Iterator[None]:
    """While inside (and ``enabled``), a first signal waits for :func:`requested` to be checked. A request still
    pending when the block ends normally is raised then; the outermost block starts with none pending."""
    global _deferring, _requested, _raised, _depth
    outermost = _depth == 0
    if outermost:
        _requested = _raised = None
    previous = _deferring
    _deferring = enabled
    _depth += 1
    try:
        yield
    except BaseException:
        _raised = None  # the stop (if it is one) left the block
        if outermost:
            _requested = None  # the block ends in an exception: the request ends with it
        raise
    finally:
        _deferring = previous
        _depth -= 1
    if _raised is not None:  # raised at once inside the block and dropped there: raised again
        signum, _raised = _raised, None
        if outermost:
            _requested = None
        raise _exception(signum)
    if outermost:
        raise_requested()


@contextlib.contextmanager
def immediate() -> Iterator[None]:
    """Inside a :func:`deferred` block: a signal raises at once (e.g. during an evaluation), and a request already
    pending is raised on entry."""
    raise_requested()
    with deferred(False):
        yield


def clear() -> None:
    """Forget a pending request (the CLI, when it hands the signals back)."""
    global _requested, _raised
    _requested = _raised = None


def requested() -> bool:
    """A stop was asked for and not yet raised (or raised at once and dropped, see the module's doc)."""
    return _requested is not None or _raised is not None


def raise_requested() -> None:
    """Raise the stop that was asked for (KeyboardInterrupt, or :class:`Terminated` for SIGTERM) and forget it."""
    global _requested
    signum, _requested = _requested, None
    if signum is not None:
        raise _exception(signum)


__all__ = ["Terminated", "clear", "deferred", "handle_signal", "immediate", "raise_requested", "requested"]
