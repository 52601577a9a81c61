"""Every file mixkd writes goes through here: never through a symbolic link, never half-written.

A folder received from someone else (a study folder copied over, a run directory unpacked) may hold a
symbolic link where mixkd writes a file (``log.txt -> ~/.bashrc``). So a whole file is written to a
temporary file beside it and moved into place with ``os.replace``, which replaces the link itself,
never its target (:func:`atomic_write`); a file that grows (a log) or is held open (a lock) is opened
with ``O_NOFOLLOW``, so a link there is refused with one line (:func:`open_nofollow`); so is a folder
that mixkd names and writes into (a run's ``tensorboard/``, a study's ``logs/`` and run folders, an
analysis folder) where it is a link (:func:`make_dir`); the folder a user names (``--out``) may be one. A write that
fails for want of room or permission (full disk, read-only mount) is one line naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from mixkd.errors import LinkRefused, MixkdError, ReadOnlyStorage, StorageError

# Writes failing for these reasons are the machine's state, not a bug: one line, the file named.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}
# ... and for these the storage's (no room, read-only): a StorageError, which stops a whole study.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
AGAIN = "run the same command again"  # the advice after a full disk (a run command that began says a better one)


def _umask() -> int:
    """The process umask, read without changing it where the system says it (Linux: /proc), since
    setting it to read it back is not thread-safe."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(path: str | Path, err: BaseException) -> MixkdError:
    """One line for a write of ``path`` that failed with ``err`` (an ``OSError`` or a library's wrapper)."""
    text = str(err).strip()
    reason = getattr(err, "strerror", None) or (text.splitlines()[0] if text else type(err).__name__)
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or "StorageFull" in str(err) or "No space" in str(err):
        hint = f"free some space (the last checkpoint is kept) and {AGAIN}"
    elif getattr(err, "errno", None) == errno.EROFS or "ReadOnly" in str(err):
        return ReadOnlyStorage(f"cannot write {path}: {reason}; the file system is read-only: write elsewhere "
                               "(--out) or copy the folder to writable storage")
    else:
        return MixkdError(f"cannot write {path}: {reason}; check the folder's permissions and free space")
    found = StorageError(f"cannot write {path}: {reason}; {hint}")
    if hint.endswith(AGAIN):
        found.problem = f"cannot write {path}: {reason}"  # for a caller that knows a better command than AGAIN
    return found


def storage_error(err: BaseException) -> StorageError | None:
    """``err`` as a :class:`StorageError` where it is a write refused for want of room or on a
    read-only file system (also one raised raw, past :func:`write_error`), else None."""
    if isinstance(err, StorageError):
        return err
    if isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS:
        found = write_error(err.filename or "a file", err)
        return found if isinstance(found, StorageError) else None
    return None


def is_environment_error(err: BaseException) -> bool:
    """Whether ``err`` is a write failing for want of room or permission (not a bug)."""
    return isinstance(err, OSError) and err.errno in _ENVIRONMENT_ERRNOS


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)``, then move the file into place in one step (never a half-written file,
    never a write through a symbolic link at ``path``: the link itself is replaced). The temporary
    file keeps ``path``'s suffix, so writers that choose a format from it (matplotlib, numpy) do.
    The file gets the mode a plain ``open(path, "w")`` gives a new file: 0666 less the umask (also
    where it replaces a file that an older mixkd wrote with mode 0600). A failure for want of room or
    permission raises :class:`MixkdError` naming ``path``; the previous file stays as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")  # mode 0600
        os.close(fd)
    except OSError as e:
        if is_environment_error(e):
            raise write_error(path, e) from None
        raise
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if is_environment_error(e):
            raise write_error(path, e) from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def link_refused(path: str | Path) -> LinkRefused:
    """The one line refusing to write through the symbolic link ``path``."""
    return LinkRefused(f"{path} is a symbolic link; mixkd does not write through links: remove it "
                       "(or the folder came from someone else: check it)")


def make_dir(path: str | Path) -> Path:
    """Create the folder ``path`` (and its parents) where missing, for mixkd to write into; refused with
    one line where ``path`` itself is a symbolic link (a folder received from someone else may hold
    ``tensorboard -> /somewhere/else``), as a file there would be. Its parents are the user's: they may
    be links. A failure for want of room or permission is one line naming the folder."""
    path = Path(path)
    try:
        if not path.is_symlink():
            path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if is_environment_error(e):
            raise write_error(path, e) from None
        raise
    if path.is_symlink():
        raise link_refused(path)
    return path


def open_nofollow(path: str | Path, mode: str = "a") -> IO[str]:
    """``open(path, mode)`` for a file that grows or is held open (``"a"``, ``"a+"``, ``"w"``), created
    with the mode of a plain ``open``, refused with one line where ``path`` is a symbolic link."""
    flags = {"a": os.O_WRONLY | os.O_CREAT | os.O_APPEND, "a+": os.O_RDWR | os.O_CREAT | os.O_APPEND,
             "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "r+": os.O_RDWR | os.O_CREAT}[mode]
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise link_refused(path) from None
        if is_environment_error(e):
            raise write_error(path, e) from None
        raise
    return os.fdopen(fd, mode)


# flock answers these where the file system has no locks (NFS without lockd: ENOLCK; Lustre mounted
# without -o flock: ENOSYS; some FUSE file systems: EOPNOTSUPP), not "another process holds it".
LOCKS_UNSUPPORTED_ERRNOS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
OWNER_SUFFIX = ".owner"  # the exclusive-create fallback's file beside a lock file: "host pid"


def locks_unsupported(err: BaseException) -> bool:
    """Whether ``err`` (from ``flock``) says that the file system has no locks, rather than that one is held."""
    return isinstance(err, OSError) and err.errno in LOCKS_UNSUPPORTED_ERRNOS


def hold_lock(path: str | Path) -> tuple[IO[str] | OwnerFileLock | None, str]:
    """An exclusive ``flock`` on ``path`` (created, never through a link) for this process, the file
    then naming its PID: (the open file, which holds it until closed, ""), or (None, the holder's PID
    as the file names it, "?" where it names none) where another process holds it. The kernel drops a
    lock with its holder, so a file left by a killed process blocks nothing; one replaced or removed
    while this process waited for it is locked anew.

    Where the file system has no ``flock`` (:func:`locks_unsupported`), the lock is the exclusive
    creation of ``<path>.owner`` naming this host and PID (:class:`OwnerFileLock`), removed when the
    returned holder is closed; a file left by a process that died is stale when it names this host and
    a PID that no longer runs (taken over), and one naming another host is refused, the holder's text
    saying so and which file to remove."""
    while True:
        f = open_nofollow(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if locks_unsupported(e):
                f.close()
                return _hold_owner_file(Path(str(path) + OWNER_SUFFIX))
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            return None, holder
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # its holder removed the file as it let go: lock the one there now
    try:
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
    except OSError as e:  # a full disk: the file created here goes, and the lock with it
        Path(path).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # its close flushes the same bytes again (and closes the file)
            f.close()
        if is_environment_error(e):
            raise write_error(path, e) from None
        raise
    return f, ""


class OwnerFileLock:
    """A lock held as an exclusively created file naming its host and PID (where ``flock`` is not
    supported); :meth:`close` removes the file (only while it is still this process's own)."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd
        self._ino = os.fstat(fd).st_ino

    def close(self) -> None:
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    @property
    def closed(self) -> bool:
        return self._fd is None


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read_owner(path: Path) -> tuple[str, int | None, int] | None:
    """(host, PID, inode) of an owner file, None where it is gone; PID None where it names none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MixkdError(f"{path} is a symbolic link; mixkd does not follow links: remove it") from None
        raise
    with os.fdopen(fd) as f:
        ino = os.fstat(f.fileno()).st_ino
        words = f.read(4096).split()
    host = words[0] if words else "?"
    pid = int(words[1]) if len(words) > 1 and words[1].isdigit() else None
    return host, pid, ino


def _hold_owner_file(path: Path) -> tuple[OwnerFileLock | None, str]:
    """The exclusive-create fallback of :func:`hold_lock` at ``path`` (``<lock file>.owner``)."""
    me = socket.gethostname()
    for _ in range(20):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            owner = _read_owner(path)
            if owner is None:
                continue  # let go meanwhile: create it again
            host, pid, ino = owner
            if pid is not None and host == me and not _pid_runs(pid):
                _remove_stale(path, ino)  # its process died on this host: stale, taken over
                continue
            if pid is None and host == me:
                return None, "?"
            where = "this host" if host == me else f"host {host}"
            return None, (f"{pid if pid is not None else '?'} on {where}; file locks are unsupported on this file "
                          f"system, so {path.name} stands for the lock" +
                          ("" if host == me else f", and whether that process still runs cannot be told from "
                           f"{me}: if it does not, remove {path}"))
        except OSError as e:
            if is_environment_error(e):
                raise write_error(path, e) from None
            raise
        try:
            os.write(fd, f"{me} {os.getpid()}\n".encode())
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            raise write_error(path, e) from None
        return OwnerFileLock(path, fd), ""
    return None, "?"


def _remove_stale(path: Path, ino: int) -> None:
    """Remove the stale owner file ``path`` whose inode was ``ino``: moved aside first, so that a file
    another process created meanwhile (a new owner) is put back, never removed."""
    aside = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if os.stat(aside).st_ino != ino:  # not the one read: a new owner's, put it back
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    os.unlink(aside)


def wait_lock(path: str | Path, waiting=None, poll_s: float = 0.2):
    """:func:`hold_lock` on ``path``, waiting while another process holds it; returns the holder (close
    it, after removing ``path``, to let go). ``waiting(holder)`` is called once, after the first refusal."""
    told = False
    while True:
        f, holder = hold_lock(path)
        if f is not None:
            return f
        if not told and waiting is not None:
            waiting(holder)
            told = True
        time.sleep(poll_s)


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path`` (created if missing), never through a symbolic link."""
    try:
        with open_nofollow(path, "a") as f:
            f.write(text)
    except OSError as e:
        if is_environment_error(e):
            raise write_error(path, e) from None
        raise


def flock_holders(path: str | Path) -> list[int]:
    """PIDs of the processes holding a ``flock`` on ``path`` (Linux: /proc/locks; [] elsewhere)."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in lines:
        parts = line.split()
        if "FLOCK" in parts and where in parts:
            pid = parts[parts.index(where) - 1]
            if pid.isdigit() and int(pid) not in pids:
                pids.append(int(pid))
    return sorted(pids)


def read_text(path: str | Path, what: str) -> str:
    """The text of ``path`` (UTF-8); one :class:`MixkdError` naming ``what`` where it is not UTF-8 text
    (a file saved in another encoding, or not a text file)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MixkdError(f"{what} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): save it "
                         "as UTF-8") from None


def read_json(path: str | Path, hint: str = "restore it from a copy, or delete it") -> Any:
    """The JSON value in ``path``; one :class:`MixkdError` naming the file where it is damaged."""
    try:
        return json.loads(Path(path).read_text())
    except UnicodeDecodeError:
        raise MixkdError(f"{path} is damaged (not text); {hint}") from None
    except json.JSONDecodeError as e:
        raise MixkdError(f"{path} is damaged (not valid JSON: {e.msg} at line {e.lineno}); {hint}") from None


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` and a file in it (then remove it), so that a read-only mount or a full quota is
    one line before long work whose results would have nowhere to go."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".mixkd-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if is_environment_error(e):
            raise write_error(folder, e) from None
        raise
