"""A run's ``metrics.jsonl`` without its timings, to compare a stopped-and-resumed run with an
uninterrupted one (``from run_rows import epoch_rows``; tests/ is on sys.path under pytest)."""

from __future__ import annotations

import json
from pathlib import Path

TIMING = ("images_per_s", "epoch_seconds")


def epoch_rows(run_dir: Path) -> list[dict]:
    """Each epoch's row of ``run_dir/metrics.jsonl`` minus the timing keys; at least one row."""
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert rows, f"{run_dir} logged no epoch"
    return rows
