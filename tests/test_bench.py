"""The GPU window's scripts (bench/GPU.md) in their CPU smoke mode: every step runs, what comes back obeys
the output rules (at most 8 files, each at most 15 MiB, at most 2 folders down), every benchmark variant
is measured; the data step refuses a damaged piece in one line. No timing is asserted."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from cifar_fixture import write_fake_cifar  # noqa: E402

MAX_BYTES = 15 * 1024 * 1024


def _script(name, tmp_path, timeout=900, **env):
    out, window = tmp_path / "out", tmp_path / "window"
    run_env = {**os.environ, "SMOKE": "1", "OUT": str(out), "WINDOW": str(window), **env}
    proc = subprocess.run(["bash", str(ROOT / "bench" / name)], capture_output=True, text=True, env=run_env,
                          timeout=timeout)
    return proc, out, window


def _files_obey_the_rules(out):
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert 0 < len(files) <= 8
    for f in files:
        rel = f.relative_to(out)
        assert f.stat().st_size <= MAX_BYTES and len(rel.parts) <= 3, rel  # $OUT/a/b/file at most
    return {str(f.relative_to(out)) for f in files}


def _header(text, script):
    lines = text.splitlines()
    assert lines[0].startswith(f"== {script} (SMOKE=1") and lines[1].startswith("commit ")
    assert lines[2].startswith("device cpu") and " torch " in lines[3]
    assert "typing-extensions==4.16.0" in lines[4] and "pydantic==" in lines[4]  # the wheels the image needs


def test_step_bench_small_mode_writes_every_variant(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "step_bench.py"), "--small", "--variants", "abdfp",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert row["pair"] == "tiny -> tiny" and set(row) == {"pair", "a", "b", "d", "f2", "p2", "p2_warmup_s"}
    assert all(row[k] > 0 for k in ("a", "b", "d", "f2", "p2", "p2_warmup_s"))  # p: two runs in a mixkd.pack.Pack
    assert result["meta"]["device"].startswith("cpu") and "torch" in result["meta"]
    assert "images/s" in proc.stdout and "tiny -> tiny" in proc.stdout


@pytest.mark.timeout(900)  # its steps have their own caps; a busy machine can take minutes
def test_device_script_smoke_runs_every_step_and_variant(tmp_path):
    proc, out, window = _script("device.sh", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _files_obey_the_rules(out) == {"tests.txt", "bench.txt", "bench.json", "compiled.txt", "compiled.json",
                                          "try.txt", "try.json", "ddp.txt"}
    assert "output rules: OK" in proc.stdout
    for name in ("tests.txt", "bench.txt", "compiled.txt", "try.txt", "ddp.txt"):
        _header((out / name).read_text(), "device.sh")
    ddp = (out / "ddp.txt").read_text()  # torchrun, 2 gloo processes, against one process
    assert "ddp check: losses agree" in ddp and ddp.count("exit status 0") == 2 and "images/s, 2 processes" in ddp
    assert "eval check: identical figures" in ddp  # on the CPU: the run's figures are its checkpoint's, bit for bit
    tests = (out / "tests.txt").read_text()
    assert tests.count("exit status 0") == 2 and "skipped" in tests  # the CUDA tests exist (and skip on the CPU)
    assert (window / "compile-tests").read_text().strip() == "skipped (no CUDA)"
    measured = {}
    for name in ("bench", "compiled", "try"):
        result = json.loads((out / f"{name}.json").read_text())
        assert result["complete"], name
        for row in result["rows"]:
            measured.update({(name, row["pair"], k): v for k, v in row.items() if isinstance(v, float)})
    keys = {k for _, _, k in measured}
    assert {"d", "e", "p2", "p", "g", "h", "q2", "q1_reset_warmup_s", "q8_reset_warmup_s", "s", "m"} <= keys
    assert ("bench", "mixed pack (2 pairs)", "p") in measured and all(v > 0 for v in measured.values())


@pytest.mark.timeout(900)
def test_claims_script_smoke_makes_its_data_falls_back_and_brings_everything_back(tmp_path):
    window = tmp_path / "window"
    # as after call 1 with failed compile tests and a failed start of the study with compile on:
    (window / "mini" / "teachers" / "resnet8_plain-s0").mkdir(parents=True)
    (window / "compile-tests").write_text("failed (pytest exit 1)\n")
    (window / "mini" / "teachers" / "resnet8_plain-s0" / "config.yaml").write_text("compile: 'on'\n")
    proc, out, _ = _script("claims.sh", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _files_obey_the_rules(out) == {"study-run.log", "report.md", "study-state.json", "workers.log",
                                          "study.tar.gz", "checkpoints.tar.gz"}
    log = (out / "study-run.log").read_text()
    _header(log, "claims.sh")
    assert "from the archive split by data.sh" in log and "3 piece(s)" in log  # joined, MD5 checked, extracted
    assert "compile=off (the CUDA compile tests: failed" in log and "moved to" in log and "fresh folder" in log
    assert len(list(window.glob("mini.old-*"))) == 1 and "compile: 'off'" in (
        window / "mini" / "teachers" / "resnet8_plain-s0" / "config.yaml").read_text()
    state = json.loads((out / "study-state.json").read_text())
    assert state["counts"]["done"] == 3
    assert "## Claims" in (out / "report.md").read_text() and "## Claims" in proc.stdout
    with tarfile.open(out / "study.tar.gz") as tf:
        names = tf.getnames()
    assert "mini/study-state.json" in names and "mini/logs/worker-0.log" in names
    assert not [n for n in names if ".compile-cache" in n or n.endswith((".safetensors", ".lock"))]
    with tarfile.open(out / "checkpoints.tar.gz") as tf:
        ckpts = tf.getnames()
    assert len(ckpts) == 3 and all(n.endswith("/checkpoint.safetensors") for n in ckpts)


def _split(tmp_path, **env):
    write_fake_cifar(tmp_path / "src", 100, n_train=120, n_test=50)
    pieces = [tmp_path / p for p in ("a", "b", "c")]
    proc = subprocess.run(["bash", str(ROOT / "bench" / "data.sh"), "split", str(tmp_path / "src"), *map(str, pieces)],
                          capture_output=True, text=True, env={**os.environ, "PIECE_BYTES": "200000", **env})
    assert proc.returncode == 0, proc.stderr
    return pieces


def _data(*args):
    return subprocess.run(["bash", str(ROOT / "bench" / "data.sh"), *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("damage", ["byte", "order", "missing"])
def test_data_step_refuses_damaged_pieces_in_one_line(tmp_path, damage):
    a, b, c = _split(tmp_path)
    pieces = [a, b, c]
    if damage == "byte":
        part = next(b.glob("part*"))
        data = bytearray(part.read_bytes())
        data[100] ^= 1
        part.write_bytes(bytes(data))
    elif damage == "order":
        pieces = [a, c, b]
    else:
        pieces = [a, tmp_path / "gone", c]
    proc = _data(tmp_path / "data", *pieces)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("data.sh: ")
    assert ("missing" in proc.stderr) if damage == "missing" else ("not the" in proc.stderr)
    assert not (tmp_path / "data" / "cifar-100-python").exists()
    assert not (tmp_path / "data" / "cifar-100-python.tar.gz").exists()  # mixkd would try to extract it


def test_data_step_joins_checks_and_claims_takes_the_archive(tmp_path):
    a, b, c = _split(tmp_path)
    proc = _data(tmp_path / "data", a, b, c)
    assert proc.returncode == 0, proc.stderr
    assert "from the archive split by data.sh" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "data" / "cifar-100-python").iterdir()) == ["meta", "test", "train"]
    # an archive without a known MD5 whose files are not a known copy: refused
    archive = tmp_path / "data" / "cifar-100-python.tar.gz"
    proc = _data(tmp_path / "other", archive)
    assert proc.returncode == 2 and "neither the official archive (MD5 eb9058c3a382ffc7106e4002c42a8d85)" in proc.stderr
    # claims.sh hands a .tar.gz to the data step (a refused one stops it before the study, exit 2)
    proc, out, _ = _script("claims.sh", tmp_path, DATA=str(archive))
    assert proc.returncode == 2 and "neither the official archive" in (out / "study-run.log").read_text()


def test_a_failed_import_stops_the_script_with_the_real_error(tmp_path):
    broken = tmp_path / "site" / "pydantic"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("typing_extensions too old: needs >= 4.16")\n')
    proc, out, _ = _script("claims.sh", tmp_path, PYTHONPATH=str(tmp_path / "site"))
    assert proc.returncode == 2 and sorted(p.name for p in out.iterdir()) == ["setup-error.txt"]
    text = (out / "setup-error.txt").read_text()
    _header(text, "claims.sh")
    assert "import failed: ImportError: typing_extensions too old: needs >= 4.16" in text
