"""Every file mixkd writes goes through here: never through a symbolic link, never half-written.

A folder received from someone else (a study folder copied over, a run directory unpacked) may hold a
symbolic link where mixkd writes a file (``log.txt -> ~/.bashrc``). So a whole file is written to a
temporary file beside it and moved into place with ``os.replace``, which replaces the link itself,
never its target (:func:`atomic_write`); a file that grows (a log) or is held open (a lock) is opened
with ``O_NOFOLLOW``, so a link there is refused with one line (:func:`open_nofollow`). A write that
fails for want of room or permission (full disk, read-only mount) is one line naming the file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any

from mixkd.errors import MixkdError, ReadOnlyStorage, StorageError

# Writes failing for these reasons are the machine's state, not a bug: one line, the file named.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}
# ... and for these the storage's (no room, read-only): a StorageError, which stops a whole study.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


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
        hint = "free some space (the last checkpoint is kept) and run the same command again"
    elif getattr(err, "errno", None) == errno.EROFS or "ReadOnly" in str(err):
        return ReadOnlyStorage(f"cannot write {path}: {reason}; the file system is read-only: write elsewhere "
                               "(--out) or copy the folder to writable storage")
    else:
        return MixkdError(f"cannot write {path}: {reason}; check the folder's permissions and free space")
    return StorageError(f"cannot write {path}: {reason}; {hint}")


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


def open_nofollow(path: str | Path, mode: str = "a") -> IO[str]:
    """``open(path, mode)`` for a file that grows or is held open (``"a"``, ``"a+"``, ``"w"``), created
    with the mode of a plain ``open``, refused with one line where ``path`` is a symbolic link."""
    flags = {"a": os.O_WRONLY | os.O_CREAT | os.O_APPEND, "a+": os.O_RDWR | os.O_CREAT | os.O_APPEND,
             "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "r+": os.O_RDWR | os.O_CREAT}[mode]
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MixkdError(f"{path} is a symbolic link; mixkd does not write through links: remove it "
                             "(or the folder came from someone else: check it)") from None
        if is_environment_error(e):
            raise write_error(path, e) from None
        raise
    return os.fdopen(fd, mode)


def hold_lock(path: str | Path) -> tuple[IO[str] | None, str]:
    """An exclusive ``flock`` on ``path`` (created, never through a link) for this process, the file
    then naming its PID: (the open file, which holds it until closed, ""), or (None, the holder's PID
    as the file names it, "?" where it names none) where another process holds it. The kernel drops a
    lock with its holder, so a file left by a killed process blocks nothing; one replaced or removed
    while this process waited for it is locked anew."""
    while True:
        f = open_nofollow(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
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
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f, ""


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
