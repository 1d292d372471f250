"""Files written whole or not at all: a temporary file beside the target, then a rename over it."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str, binary: bool = False, *, durable: bool = False) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; when the block ends without an exception, rename it over
    ``path``. A kill, a full disk or an exception leaves the previous file (if any) and no temporary one; a failed
    write (a full disk) is an OSError that names ``path`` (:func:`write_error`).

    The file gets the umask's permissions, as ``open()`` gives.
    ``durable`` fsyncs the file before the rename and the folder after it, so the rename survives a power loss."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # A name no other process or thread uses; the run folder's clean-up removes ".<name>.*.tmp" a kill left behind.
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:  # a write's error names no file
            raise write_error(path, e) from e
        raise
    if durable:
        with contextlib.suppress(OSError):
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (:func:`atomic_open`), with the umask's permissions."""
    with atomic_open(path) as f:
        f.write(text)


def write_error(path: str, error: OSError) -> OSError:
    """A failed write of ``path`` (a full disk, ...) as an OSError whose message names the file."""
    return OSError(error.errno, f"could not write {path}: {error.strerror or error}")


__all__ = ["atomic_open", "atomic_write_text", "write_error"]
