"""One run per folder: a training run refuses a folder that holds another run, and locks the folder it writes.

A run folder holds :data:`RUN_FILES` (and :data:`SIDE_FILES`). ``csl train`` into a folder that holds them continues
that run with ``--resume`` (``train.resume``), replaces it with ``--overwrite`` (``train.overwrite=true``), and
otherwise stops before writing anything. A replaced run's files are set aside in :data:`REPLACED_DIR` until the new
start has built its data and model: a start that fails puts them back (also the next start, after a kill), one that
succeeds deletes them. Only files this package writes are replaced: a ``config.yaml`` it did not write (a user's
``--config`` file in ``output_dir``) is refused, and in ``tb/`` only TensorBoard event files are moved. While a run
trains, ``.csl.lock`` names its process, host and start time; a second trainer on the same folder stops with that name.
A lock left by a process that no longer runs (on this host: its process id is free, or taken by a process started
later, as a container's restarted trainer is PID 1 again) is taken over with a warning.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time

log = logging.getLogger("csl")

# What makes a folder hold a run (a checkpoint, a non-empty metrics log, the demo's done mark); a start that failed
# before training leaves at most train.log and config.yaml (written once the set-up succeeded), which the next start
# replaces.
RUN_FILES = ("latest.pt", "best.pt", "metrics.jsonl", "done.json")
SIDE_FILES = ("config.yaml", "train.log")
TENSORBOARD_DIR = "tb"  # scalars of a run (csl.logging_utils.MetricsWriter), replaced with it
TENSORBOARD_EVENTS = "events.out.tfevents."  # the prefix of the files SummaryWriter writes there
REPLACED_DIR = ".csl-replaced"  # a replaced run's files while the new start sets up
DISCARDED_SUFFIX = ".discarded"  # REPLACED_DIR renamed once the new start has succeeded, while it is deleted
RUN_CONFIG_HEADER = "# csl train: the configuration of this run\n"  # the first line of the config.yaml a run writes
LOCK_NAME = ".csl.lock"
# The checkpoints UniMatch's scripts save into their --save-path (another trainer's run: csl cannot continue it).
UNIMATCH_CHECKPOINTS = ("latest.pth", "best.pth")


class RunFolderError(RuntimeError):
    """The run folder holds another run, or another process trains into it."""


def check_output_folder(path: str, flag: str = "--out") -> None:
    """``path`` is a folder this process can write in, or can be made one: a ValueError naming ``flag`` when it, or
    the nearest of its parents that exists, is a file or cannot be written in (a read-only file system, no
    permission), said before any work, not by the first write after it. Nothing is left behind by the check."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "is a file" if probe == os.path.abspath(path) else f"is inside {probe}, which is a file"
        raise ValueError(f"{flag} {path} {where}; give a folder")
    try:  # the write the command's first file would make: a folder made and removed again
        os.rmdir(tempfile.mkdtemp(prefix=".csl-write-check-", dir=probe))
    except OSError as e:
        where = "" if probe == os.path.abspath(path) else f" (in {probe}, the nearest folder of it that exists)"
        raise ValueError(f"{flag} {path}: cannot write there{where}: {e.strerror or e}; give a folder you can "
                         f"write in") from None


def existing_run_files(folder: str) -> list[str]:
    found = []
    for name in RUN_FILES:
        path = os.path.join(folder, name)
        if os.path.exists(path) and not (name == "metrics.jsonl" and os.path.getsize(path) == 0):
            found.append(name)
    return found


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux's /proc/<pid>/stat, field 22); None where
    unknown. With the boot id it tells a process from a later one given the same id: after a crash in a container
    the restarted trainer is often PID 1 again, as the crashed one was."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
        return int(fields[19])  # field 22; the list starts at field 3
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


class RunLock:
    """``.csl.lock`` in a run folder, held from :func:`claim_run_folder` until :meth:`release` (or exit); it knows
    whether a replaced run waits in :data:`REPLACED_DIR` (:meth:`discard_replaced` / :meth:`restore_replaced`)."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_NAME)
        self.held = False
        self.text: str | None = None  # what this process wrote into the lock
        self.replaced: str | None = None

    def discard_replaced(self) -> None:
        """The new start has succeeded: the replaced run's files go (renamed first, so a kill while they are deleted
        leaves no part of them for the next start to put back)."""
        if self.replaced is not None:
            discarded = self.replaced + DISCARDED_SUFFIX
            shutil.rmtree(discarded, ignore_errors=True)  # what an earlier deletion could not remove
            try:
                os.replace(self.replaced, discarded)
            except OSError:  # the start has succeeded: the replaced run is deleted where it lies
                discarded = self.replaced
            shutil.rmtree(discarded, ignore_errors=True)
            self.replaced = None

    def restore_replaced(self) -> None:
        """The new start failed: the replaced run's files come back."""
        if self.replaced is not None:
            _restore(os.path.dirname(self.replaced))
            self.replaced = None

    def acquire(self) -> None:
        pid = os.getpid()
        me = {"pid": pid, "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "boot": _boot_id(), "process_start": _process_start(pid)}
        self.text = json.dumps(me)
        for _ in range(2):
            try:
                self._create(self.text)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._stale(holder):
                    raise RunFolderError(
                        f"{os.path.dirname(self.path)} is in use by process {holder.get('pid')} on "
                        f"{holder.get('host')} (since {holder.get('started')}): two trainers must not write one run "
                        f"folder. Choose another output_dir, or remove {self.path} if that process is gone.") from None
                log.warning("taking over %s, left by process %s on %s that no longer runs", self.path,
                            (holder or {}).get("pid"), (holder or {}).get("host"))
                self._remove_stale(holder)
                continue
            self.held = True
            atexit.register(self.release)
            return
        raise RunFolderError(f"could not take the lock {self.path}")

    def _remove_stale(self, holder: dict | None) -> None:
        """Remove the lock found stale, if it is still that one: another trainer that found it stale too may have
        taken it over since, and its lock is live. The lock is renamed to a name of this process first (one step,
        so only one trainer gets it) and read again; a lock other than the stale one is put back."""
        aside = f"{self.path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"  # cleared with the orphans after a kill
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # removed or renamed by another trainer taking it over
            return
        try:
            with open(aside) as f:
                moved = json.load(f)
        except (OSError, ValueError):
            moved = None
        if moved != holder:  # another trainer's live lock: back under its name (unless a third one took that)
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            except OSError:  # no hard links here
                if not os.path.exists(self.path):
                    os.replace(aside, self.path)
        with contextlib.suppress(FileNotFoundError):
            os.remove(aside)

    def _create(self, text: str) -> None:
        """Create the lock file with ``text`` in one step (FileExistsError when it exists): written to a temporary
        file, then hard-linked to the lock's name, so another trainer never reads a lock that exists but is still
        empty (which it would take for a stale one). Where the file system has no hard links, an exclusive create
        and a write."""
        # A name of its own (two hosts sharing the folder may have the same process id); the lock's usual mode.
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=os.path.basename(self.path) + ".",
                                   suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            raise
        except OSError:  # no hard links here
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None  # unreadable or half-written: treated as stale

    @staticmethod
    def _stale(holder: dict) -> bool:
        """The holder ran on this host and is gone: its process id is free, or taken by another process (one started
        at another time, or since a reboot). A lock of another host is never stale here."""
        if holder.get("host") != socket.gethostname():
            return False
        pid = int(holder.get("pid", -1))
        if not _process_alive(pid):
            return True
        if holder.get("boot") is not None and holder["boot"] != _boot_id():
            return True
        return holder.get("process_start") is not None and holder["process_start"] != _process_start(pid)

    def _still_mine(self) -> bool:
        try:
            with open(self.path) as f:
                return f.read() == self.text
        except OSError:
            return False

    def check_held(self) -> None:
        """Raise RunFolderError when the lock is no longer this process's: the run folder was removed or moved while
        the run trained (a checkpoint written now would make a new folder holding none of the run's records), or its
        lock was removed and another trainer may have taken the folder."""
        if self.held and not self._still_mine():
            folder = os.path.dirname(self.path)
            holder = self._holder()
            now = (f"process {holder.get('pid')} on {holder.get('host')} holds it now" if holder else
                   "the folder is gone" if not os.path.isdir(folder) else "no lock is there now")
            raise RunFolderError(f"{folder} no longer holds this run's lock {LOCK_NAME} ({now}): the run folder was "
                                 f"removed, moved or taken by another trainer while this run trained; stopped "
                                 f"without writing into it")

    def release(self) -> None:
        if self.held:
            self.held = False
            if self._still_mine():  # not another trainer's, which took the folder after this lock was removed
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                except OSError as e:  # a folder made read-only: the error that ends the run is the one raised
                    log.warning("could not remove the run folder's lock %s: %s (the next start takes it over, as "
                                "its process is gone)", self.path, e.strerror or e)


def claim_run_folder(folder: str, *, resuming: bool, resume_auto: bool, overwrite: bool,
                     resume_path: str | None = None) -> RunLock:
    """Lock ``folder`` for a run and make sure it starts from what the user asked for (see the module's doc).

    ``resuming``: a checkpoint will be loaded (``resume_path``, when known); ``resume_auto``: ``train.resume=auto``
    was given (with no checkpoint in the folder, the files of a run that never reached one are replaced);
    ``overwrite``: replace any run there. A checkpoint of another folder resumes only into a folder without a run:
    the resumed run would overwrite that run's checkpoints and cut its metrics.
    """
    check_output_folder(folder, "output_dir")
    os.makedirs(folder, exist_ok=True)
    lock = RunLock(folder)
    lock.acquire()
    _put_back(folder)
    found = existing_run_files(folder)
    if found and not resuming and not (overwrite or resume_auto):
        lock.release()
        if not any(name.endswith(".pt") for name in found):  # nothing to continue: --resume auto would replace it
            raise RunFolderError(
                f"{folder} holds the files of a run but no checkpoint ({', '.join(found)}), so there is nothing to "
                f"continue; replace it with --overwrite (train.overwrite=true) or choose another output_dir")
        raise RunFolderError(
            f"{folder} already holds a run ({', '.join(found)}); continue it with --resume auto "
            f"(train.resume=auto), replace it with --overwrite (train.overwrite=true), or choose another output_dir")
    if found and resuming and resume_path is not None and not _same_folder(os.path.dirname(resume_path), folder):
        lock.release()
        raise RunFolderError(
            f"{folder} already holds a run ({', '.join(found)}), and the checkpoint to resume, {resume_path}, is "
            f"another folder's; resume it into its own folder (output_dir={os.path.dirname(resume_path) or '.'}) "
            f"or into an empty output_dir")
    if not resuming:  # a new run: the replaced run's files, or what a start that failed before training left
        config = os.path.join(folder, "config.yaml")
        if not found and os.path.isfile(config) and not _written_by_a_run(config):
            lock.release()
            raise RunFolderError(
                f"{config} was not written by csl train (your --config file?): a run writes its merged config "
                f"there; choose another output_dir")
        if found:
            why = "train.overwrite=true" if overwrite else "train.resume=auto found no checkpoint to continue"
            log.warning("%s: replacing the run in %s (%s; its files are deleted once this start has built its "
                        "data and model)", why, folder, ", ".join(found))
        elif resume_auto:
            theirs = [n for n in UNIMATCH_CHECKPOINTS if os.path.isfile(os.path.join(folder, n))]
            if theirs:  # UniMatch resumes from its latest.pth: asked to continue, csl says it cannot
                lock.release()
                raise RunFolderError(
                    f"{folder} holds UniMatch's {', '.join(theirs)}, not a csl run (latest.pt / best.pt): --resume "
                    f"auto (train.resume=auto) continues csl's runs only. Start from its weights in another folder "
                    f"with train.init_from={os.path.join(folder, theirs[0])}, or choose another output_dir "
                    f"(--save-path)")
            # A warning: run from another working directory, a relative output_dir names another folder.
            log.warning("train.resume=auto: no checkpoint in %s, starting a new run", os.path.abspath(folder))
        lock.replaced = _set_aside(folder)
        if not found:  # what a failed start left (its train.log, config.yaml): replaced now, not put back if this fails
            lock.discard_replaced()
    _remove_orphans(folder)
    return lock


def put_back_replaced_run(folder: str) -> None:
    """Before a start looks for checkpoints to resume: the run a replacing start set aside and was killed before it
    trained comes back (under the folder's lock; refused while a live run holds it), so ``--resume auto`` continues
    it instead of taking the folder for one without a checkpoint and replacing it again."""
    if any(os.path.isdir(os.path.join(folder, REPLACED_DIR + end)) for end in ("", DISCARDED_SUFFIX)):
        lock = RunLock(folder)
        lock.acquire()
        try:
            _put_back(folder)
        finally:
            lock.release()


def _put_back(folder: str) -> None:
    """What a killed start left of a replaced run: the run set aside comes back, one being deleted goes."""
    discarded = os.path.join(folder, REPLACED_DIR + DISCARDED_SUFFIX)
    if os.path.isdir(discarded):  # a start that succeeded was killed while it deleted the replaced run
        shutil.rmtree(discarded, ignore_errors=True)
    if os.path.isdir(os.path.join(folder, REPLACED_DIR)):  # a replacing start was killed before it trained
        log.warning("%s: putting back the run a replacing start set aside in %s (it stopped before training)",
                    folder, REPLACED_DIR)
        _restore(folder)


def _written_by_a_run(config: str) -> bool:
    with open(config, errors="replace") as f:
        return f.readline() == RUN_CONFIG_HEADER


def _set_aside(folder: str) -> str | None:
    """Move the run's files (and tb/'s event files) into ``REPLACED_DIR``; its path, or None when there were none."""
    names = [n for n in RUN_FILES + SIDE_FILES if os.path.lexists(os.path.join(folder, n))]
    tb = os.path.join(folder, TENSORBOARD_DIR)
    if os.path.isdir(tb):
        names += [os.path.join(TENSORBOARD_DIR, n) for n in sorted(os.listdir(tb)) if n.startswith(TENSORBOARD_EVENTS)]
    if not names:
        return None
    aside = os.path.join(folder, REPLACED_DIR)
    os.makedirs(os.path.join(aside, TENSORBOARD_DIR), exist_ok=True)
    for name in names:
        os.replace(os.path.join(folder, name), os.path.join(aside, name))
    return aside


def _restore(folder: str) -> None:
    """Move what ``REPLACED_DIR`` holds back into ``folder`` (over what a failed start wrote) and remove it."""
    aside = os.path.join(folder, REPLACED_DIR)
    for dirpath, _, files in os.walk(aside):
        for name in files:
            relative = os.path.relpath(os.path.join(dirpath, name), aside)
            os.makedirs(os.path.dirname(os.path.join(folder, relative)), exist_ok=True)
            os.replace(os.path.join(aside, relative), os.path.join(folder, relative))
    shutil.rmtree(aside, ignore_errors=True)


def _same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a or ".") == os.path.realpath(b or ".")


def _remove_orphans(folder: str) -> None:
    """Temporary files a killed writer left behind (``.latest.pt.*.tmp``, ``.config.yaml.*.tmp``,
    ``.csl.lock.*.tmp``)."""
    prefixes = tuple(f".{f}." for f in RUN_FILES + SIDE_FILES) + (LOCK_NAME + ".",)
    for name in os.listdir(folder):
        if name.endswith(".tmp") and name.startswith(prefixes):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
                log.info("removed %s, left by an interrupted write", name)
