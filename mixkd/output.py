"""What a run shows while it trains: its log (``log.txt``, echoed to the terminal), a tqdm progress
bar (a terminal only) and TensorBoard scalars (when asked for)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from mixkd.errors import MixkdError
from mixkd.files import make_dir
from mixkd.run_folder import RunFolder


class RunOutput:
    """The output of one run into ``folder``. ``echo`` receives each log line (None: the log file
    only); ``progress`` asks for a progress bar (shown where there is an echo and stderr is a terminal);
    ``tensorboard`` for scalars in the folder's ``tensorboard/``."""

    def __init__(self, folder: RunFolder, echo: Callable[[str], None] | None, *, progress: bool = True,
                 tensorboard: bool = False, title: str = ""):
        self.folder, self.echo, self.title = folder, echo, title
        self.want_progress, self.want_tensorboard = progress, tensorboard
        self.bar = None
        self.writer = None

    def open(self, total_steps: int, done_steps: int) -> None:
        """Start the progress bar and the TensorBoard writer (after the folder exists)."""
        self.writer = self._tensorboard()
        self.bar = self._progress_bar(total_steps, done_steps)

    def log(self, line: str) -> None:
        self.folder.append_log(line)
        if self.echo is not None:
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)
            else:
                self.echo(line)

    def describe(self, text: str) -> None:
        """What the bar says it is doing (the epoch)."""
        if self.bar is not None:
            self.bar.set_description(f"{self.title} {text}")

    def phase(self, text: str) -> None:
        """A phase that takes a while (compiling, evaluating) shown beside the bar."""
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def stepped(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def epoch(self, row: dict[str, Any]) -> None:
        """An epoch's metrics row: TensorBoard scalars and the bar's summary."""
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch":
                    self.writer.add_scalar(key, value, row["epoch"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['train_loss']:.3f}", top1=f"{row['test_top1']:.2f}",
                                 img_s=f"{row['images_per_s']:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _tensorboard(self):
        if not self.want_tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MixkdError("--tensorboard needs TensorBoard: pip install tensorboard") from None
        return SummaryWriter(log_dir=str(make_dir(self.folder.tensorboard)))  # never through a planted link

    def _progress_bar(self, total: int, initial: int):
        if not self.want_progress or self.echo is None or not sys.stderr.isatty():
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc=self.title, leave=False)
