"""User-facing errors: one line saying what is wrong and what to do."""


class MixkdError(Exception):
    """An error caused by the user's input (config, data, checkpoint).

    The CLI prints ``str(err)`` on one line and exits with status 2, never a traceback.
    """


class StorageError(MixkdError):
    """A write failed for want of room (a full disk, a quota) or on a read-only file system: the
    machine's state, not the run's. The run keeps its last checkpoint; a study stops (every run
    resumable) instead of failing its runs one by one. ``problem``: what failed, without the advice
    (where known)."""

    problem: str | None = None


class LinkRefused(StorageError):
    """A write refused because the file or folder mixkd would write is a symbolic link (a folder received
    from someone else): like a full disk, the folder's state, not the run's, so a study stops (every
    run resumable, none failed) rather than writing its error files through the link."""


class ReadOnlyStorage(StorageError):
    """A write refused because the file system is mounted read-only."""


class TrainingDiverged(MixkdError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class FolderInUse(MixkdError):
    """A run folder held by another live process (its lock; :meth:`mixkd.run_folder.RunFolder.lock`)."""
