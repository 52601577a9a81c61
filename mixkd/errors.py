"""User-facing errors: one line saying what is wrong and what to do."""


class MixkdError(Exception):
    """An error caused by the user's input (config, data, checkpoint).

    The CLI prints ``str(err)`` on one line and exits with status 2, never a traceback.
    """


class TrainingDiverged(MixkdError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
