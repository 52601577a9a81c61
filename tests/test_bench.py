"""The benchmark's CPU smoke mode runs and writes its table and JSON (no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_step_bench_small_mode_writes_every_variant(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "step_bench.py"), "--small", "--variants", "abdfp",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert row["pair"] == "resnet8 -> resnet8" and set(row) == {"pair", "a", "b", "d", "f2", "p2", "p2_warmup_s"}
    assert all(row[k] > 0 for k in ("a", "b", "d", "f2", "p2", "p2_warmup_s"))  # p: two runs in a mixkd.pack.Pack
    assert result["meta"]["device"].startswith("cpu") and "torch" in result["meta"]
    assert "images/s" in proc.stdout and "resnet8 -> resnet8" in proc.stdout
