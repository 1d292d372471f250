"""Run outputs: a plain log file, JSON lines of metrics, TensorBoard scalars (when ``tensorboard`` is installed) and a
tqdm progress bar, all on rank 0 only."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time

from csl_kernels import log_backend_choices_again

from .files import atomic_write_text, write_error
from .run_folder import TENSORBOARD_DIR

log = logging.getLogger("csl")
_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _TqdmHandler(logging.StreamHandler):
    """Writes through ``tqdm.write`` so log lines do not break an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _FileHandler(logging.FileHandler):
    """``train.log``: a line it cannot write (a full disk) is said once on stderr, not as a traceback per line."""

    def handleError(self, record: logging.LogRecord) -> None:
        if not getattr(self, "_said", False):
            self._said = True
            error = sys.exc_info()[1]
            sys.stderr.write(f"csl: could not write {self.baseFilename}: {error}; the log goes on on the console "
                             f"only\n")


# The trainer's own logger and the kernels' (backend choices, fallbacks, launch-configuration tuning).
LOGGERS = ("csl", "csl_kernels")


class _Holder(logging.Handler):
    """Keeps the records of :func:`held_records`; on the console too where nothing else would say them."""

    def __init__(self, held: list[logging.LogRecord]):
        super().__init__()
        self.held = held
        self.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self.held.append(record)
        logger = logging.getLogger("csl")
        if record.levelno >= logging.WARNING and not any(h is not self for h in logger.handlers):
            sys.stderr.write(self.format(record) + "\n")  # what logging's last resort would print, with the time


@contextlib.contextmanager
def held_records(held: list[logging.LogRecord]):
    """The ``csl`` records of the block also go to ``held``: what a run says before its log file exists (claiming
    its folder), for :func:`setup_logging` to write into it."""
    logger = logging.getLogger("csl")
    holder = _Holder(held)
    logger.addHandler(holder)
    try:
        yield
    finally:
        logger.removeHandler(holder)


def setup_logging(output_dir: str | None, is_main: bool = True, level: int = logging.INFO,
                  held: list[logging.LogRecord] = ()) -> logging.Logger:
    """Configure the ``csl`` and ``csl_kernels`` loggers: console (through tqdm) and ``<output_dir>/train.log`` on
    rank 0; warnings only on other ranks. Replaces handlers installed by an earlier call, and has the kernels log
    their backend choices again, so that each run's log names them; returns the ``csl`` one. ``held``: records said
    before the log file existed (:func:`held_records`), written into it first (they were on the console already)."""
    handlers: list[logging.Handler] = [_TqdmHandler(sys.stderr)]
    if is_main and output_dir:
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(_FileHandler(os.path.join(output_dir, "train.log")))
    for h in handlers:
        h.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        h._csl_handler = True
    closed: set[int] = set()
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if getattr(h, "_csl_handler", False):
                logger.removeHandler(h)
                if id(h) not in closed:
                    closed.add(id(h))
                    h.close()
        logger.setLevel(level if is_main else logging.WARNING)
        logger.propagate = False
        for h in handlers:
            logger.addHandler(h)
    for record in held:
        for h in handlers:
            if isinstance(h, logging.FileHandler) and record.levelno >= h.level:
                h.handle(record)
    log_backend_choices_again()
    return logging.getLogger("csl")


def log_to_files(message: str, level: int = logging.ERROR) -> None:
    """``message`` into the log files of the run set up last in this process (its ``train.log``), not the console:
    how a command's final error, printed on stderr, also ends the run's log."""
    logger = logging.getLogger("csl")
    record = logger.makeRecord(logger.name, level, __file__, 0, message, None, None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler) and getattr(handler, "_csl_handler", False):
            handler.handle(record)


def one_line(error: BaseException) -> str:
    """The message of ``error`` in one line: a DataLoader worker's error carries the worker's traceback, cut to its
    last line; any other message's lines are joined."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if "Original Traceback (most recent call last):" in lines:
        return lines[-1]
    return " ".join(lines)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class MetricsWriter:
    """``<output_dir>/metrics.jsonl`` (one JSON object per record; NaN written as null) and, when the
    ``tensorboard`` package is installed, scalars under ``<output_dir>/tb``. Does nothing when not ``enabled``.

    ``resumed_at``: the iteration a resumed run continues from; TensorBoard hides the scalars a killed run logged
    after it (as :func:`prune_metrics` drops its records), so the continued run's are not shown twice. With
    ``eval_pending`` (the checkpoint's evaluation at ``resumed_at`` runs again) it hides those of ``resumed_at`` too,
    an evaluation logged there before the kill among them, and logs that iteration's kept records (training,
    pseudo-labels) again from ``metrics.jsonl``."""

    def __init__(self, output_dir: str, enabled: bool = True, tensorboard: bool = True, resumed_at: int | None = None,
                 eval_pending: bool = False):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._file = None
        self._write_failed = False
        self._tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.debug("tensorboard is not installed: no TensorBoard scalars")
            else:
                purge = (resumed_at if eval_pending else resumed_at + 1) if resumed_at else None
                self._tb = SummaryWriter(os.path.join(output_dir, TENSORBOARD_DIR), purge_step=purge)
                if resumed_at and eval_pending:
                    for record in read_metrics(self.path):
                        if record.get("iter") == resumed_at and record.get("kind") != "eval":
                            # a value written as null was a NaN / inf scalar (see _json_safe): logged as NaN again
                            self._add_scalars({k: math.nan if v is None else v for k, v in record.items()},
                                              resumed_at)

    def write(self, record: dict, step: int | None = None) -> None:
        if not self.enabled:
            return
        try:
            self._file.write(json.dumps(_json_safe(record)) + "\n")
            self._file.flush()
        except OSError as e:  # a full disk: the file named (a torn last line is dropped by the next start)
            self._write_failed = True
            raise write_error(self.path, e) from None
        if self._tb is not None and step is not None:
            self._add_scalars(record, step)

    def _add_scalars(self, record: dict, step: int) -> None:
        kind = record.get("kind", "train")
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("iter", "epoch"):
                self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        """Close the files. After a failed write the record's unwritten rest, still buffered, is dropped (the write
        raised the error that names the file; closing would only fail again, without the name)."""
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError as e:
                if not self._write_failed:
                    raise write_error(self.path, e) from None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def prune_metrics(path: str, iteration: int, eval_pending: bool = False) -> int:
    """Drop the records of iterations after ``iteration`` from ``metrics.jsonl`` (what a killed run logged after its
    last checkpoint, which the resumed run logs again), and with ``eval_pending`` (the checkpoint's evaluation at
    ``iteration`` is still to run) an evaluation record of ``iteration`` (logged by an evaluation whose save did not
    land); returns how many were dropped. The file is replaced atomically."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8", errors="replace") as f:  # a line with other bytes is not a record: dropped
        lines = [line for line in f if line.strip()]
    records = _parsed(path, lines)
    keep = [line if line.endswith("\n") else line + "\n" for line, record in zip(lines, records, strict=True)
            if record is not None and record.get("iter", 0) <= iteration
            and not (eval_pending and record.get("kind") == "eval" and record.get("iter") == iteration)]
    if len(keep) == len(lines):
        return 0
    atomic_write_text(path, "".join(keep))
    return len(lines) - len(keep)


def _parsed(path: str, lines: list[str]) -> list[dict | None]:
    """Each line's record; None, with a warning, for a line that is not one (a torn last line of a killed run or
    a full disk)."""
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            logging.getLogger("csl").warning("%s: line %d is not a JSON record (a write cut short?); skipped: %.60r",
                                             path, number, line)
            record = None
        records.append(record)
    return records


def read_metrics(path: str, kind: str | None = None) -> list[dict]:
    """Records of a ``metrics.jsonl`` file (optionally only those of one ``kind``); a line that is not a record is
    skipped with a warning (bytes that are not UTF-8 included)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    return [r for r in _parsed(path, lines) if r is not None and (kind is None or r.get("kind") == kind)]


def best_miou(evals: list[dict]) -> float | None:
    """The highest ``miou`` of a run's eval records; None where none is defined (no record, or every one ``null``:
    a validation set without a labelled pixel)."""
    return max((e["miou"] for e in evals if e.get("miou") is not None), default=None)


def bar_disabled(enabled: bool) -> bool | None:
    """tqdm's ``disable`` for a progress bar: off when not ``enabled``; else drawn only where stderr is a terminal
    (tqdm's ``None``), so a log file under nohup or a scheduler gets the log lines, not thousands of bar frames."""
    return None if enabled else True


HEARTBEAT_S = 20.0  # where no bar is drawn: a line after this many seconds of work, then at this interval


class _LoggedProgress:
    """What :func:`with_progress` gives where stderr is no terminal (nohup, a scheduler, a pipe): an INFO line
    ``<desc>: k of n (t s)`` once the work has run ``HEARTBEAT_S`` seconds and then at that interval, and a last
    line at the end where one was said; short work stays quiet. Iterable like a tqdm bar."""

    def __init__(self, iterable, total: int | None, desc: str):
        self.iterable, self.total, self.desc, self.n = iterable, total, desc, 0
        self.start = self.last = time.monotonic()
        self.said_n: int | None = None  # the count of the last line said

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def _line(self) -> None:
        of = f" of {self.total}" if self.total is not None else ""
        log.info("%s: %d%s (%.0f s)", self.desc, self.n, of, time.monotonic() - self.start)
        self.said_n = self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= HEARTBEAT_S:
            self._line()
            self.last = time.monotonic()

    def close(self) -> None:
        if self.said_n is not None and self.said_n != self.n:  # work long enough to be said: its end is said too
            self._line()


def _stderr_is_a_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def with_progress(iterable, *, desc: str, enabled: bool = True):
    """Progress of long work over ``iterable``: a tqdm bar where stderr is a terminal, else log lines every
    ``HEARTBEAT_S`` seconds (:class:`_LoggedProgress`), nothing when not ``enabled``."""
    from tqdm import tqdm

    total = len(iterable) if hasattr(iterable, "__len__") else None
    if enabled and not _stderr_is_a_terminal():
        return _LoggedProgress(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False,
                file=sys.stderr)


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=bar_disabled(enabled), desc=desc, dynamic_ncols=True,
                leave=False, file=sys.stderr)


__all__ = ["MetricsWriter", "bar_disabled", "held_records", "log_to_files", "one_line", "progress_bar",
           "read_metrics", "setup_logging", "with_progress"]
