"""bench/data_bench.py: bench/device.sh's data step runs it in smoke mode and it writes its table and
JSON within the output rules (no figure is asserted); its GPU decoding path runs on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import data_bench  # noqa: E402


def test_generated_folder_and_the_decoding_path(tmp_path):
    root = data_bench.make_jpegs(tmp_path / "d", images=10, classes=2, size=(40, 30), distinct=4)
    train = sorted((root / "train").rglob("*.JPEG"))
    assert len(train) == 10 and len(list((root / "val").rglob("*.JPEG"))) == 2
    c0 = root / "train" / "c0"
    assert os.path.samefile(c0 / "000000.JPEG", c0 / "000004.JPEG")  # image 4 is image 0 again (a hard link)
    assert not os.path.samefile(c0 / "000000.JPEG", c0 / "000002.JPEG")
    rows = data_bench.decode_rates(root, [4], rounds=2, crop=16, device="cpu")  # the GPU mode's code, on the CPU
    assert [(r["batch"], r["timed_images"]) for r in rows] == [(4, 8)]


@pytest.mark.timeout(300)
def test_device_script_data_step_in_smoke_mode(tmp_path):
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path / "out"), "WINDOW": str(tmp_path / "window")}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "device.sh"), "data"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data.json", "data.txt"]
    assert "output rules: OK" in proc.stdout and "-- data (data.txt, data.json; exit status 0)" in proc.stdout
    text = (tmp_path / "out" / "data.txt").read_text()
    assert text.startswith("== device.sh (SMOKE=1") and "| workers | images/s | per worker | first batch (s) |" in text
    assert "GPU mode: no CUDA here, skipped" in text  # this machine has none
    result = json.loads((tmp_path / "out" / "data.json").read_text())
    assert [r["workers"] for r in result["cpu"]] == [0, 1] and result["gpu"] is None
    assert all(r["images_per_s"] > 0 and r["timed_images"] > 0 for r in result["cpu"])
    assert result["meta"]["data"].startswith("48 generated JPEG files (24 distinct")
