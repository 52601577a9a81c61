"""The program's entry point (the ``mixkd`` command and ``python -m mixkd``).

Stops are heard from its first line: SIGTERM, SIGUSR1 and Ctrl-C are recorded before anything heavy
(pydantic, torch) is imported, and the command's :class:`mixkd.control.StopControl` adopts a stop
that came meanwhile (see :mod:`mixkd.control`).
"""

import sys

from mixkd.control import catch_early_stops

catch_early_stops()
try:
    from mixkd.cli import main  # noqa: E402
except KeyboardInterrupt:  # a second Ctrl-C while the program starts: nothing was written
    print("\ninterrupted", file=sys.stderr)
    sys.exit(130)

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
