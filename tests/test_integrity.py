"""Checkpoint integrity and writes that never follow symbolic links nor leave tracebacks (issue 19)."""

from __future__ import annotations

import json
import os
import resource
import signal

import pytest
import torch
from safetensors.torch import save_file

from mixkd.checkpoint import _digest, load_checkpoint, save_checkpoint
from mixkd.errors import MixkdError
from mixkd.files import append_text, atomic_write, atomic_write_text, open_nofollow
from mixkd.models import create_model


def _tiny_checkpoint(path, epoch=1, step=3):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    save_checkpoint(path, model, model_name="lin", num_classes=2, epoch=epoch, optimizer=opt,
                    rng={"torch_cpu": torch.get_rng_state()}, extra={"step": step})
    return model


def _edit(path, old: bytes, new: bytes):
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))


def test_an_edited_epoch_or_step_in_the_header_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    _tiny_checkpoint(path)
    assert (load_checkpoint(path).epoch, load_checkpoint(path).step) == (1, 3)
    _edit(path, b'\\"epoch\\": 1', b'\\"epoch\\": 4')  # the header holds the metadata JSON as a JSON string
    with pytest.raises(MixkdError, match="corrupt or was edited"):
        load_checkpoint(path)
    _tiny_checkpoint(path)
    _edit(path, b'\\"step\\": 3', b'\\"stpe\\": 3')
    with pytest.raises(MixkdError, match="corrupt or was edited"):
        load_checkpoint(path)


def test_an_edited_dtype_in_the_header_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    _tiny_checkpoint(path)
    _edit(path, b'"model.bias":{"dtype":"F32"', b'"model.bias":{"dtype":"I32"')
    with pytest.raises(MixkdError, match="corrupt or was edited"):
        load_checkpoint(path)


def test_checkpoints_of_the_older_format_still_load(tmp_path):
    model = torch.nn.Linear(2, 2)
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "mixkd-checkpoint-1", "model": "lin", "num_classes": 2, "epoch": 2}
    save_file(tensors, tmp_path / "old.safetensors", metadata={"mixkd": json.dumps(meta), "sha256": _digest(tensors)})
    ckpt = load_checkpoint(tmp_path / "old.safetensors")
    assert ckpt.epoch == 2 and torch.equal(ckpt.state_dict["weight"], model.weight)
    meta["format"] = "mixkd-checkpoint-9"
    save_file(tensors, tmp_path / "new.safetensors", metadata={"mixkd": json.dumps(meta), "sha256": _digest(tensors)})
    with pytest.raises(MixkdError, match="format 'mixkd-checkpoint-9'"):
        load_checkpoint(tmp_path / "new.safetensors")


def test_broken_metadata_json_is_one_line(tmp_path):
    path = tmp_path / "c.safetensors"
    _tiny_checkpoint(path)
    _edit(path, b'{\\"format', b'[\\"format')
    with pytest.raises(MixkdError, match="metadata is not a JSON object"):
        load_checkpoint(path)


@pytest.fixture
def small_file_limit():
    """Writes beyond 64 kB fail with EFBIG, as on a full disk (restored afterwards)."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tmp_path, small_file_limit):
    path = tmp_path / "checkpoint.safetensors"
    _tiny_checkpoint(path)  # small enough to fit
    before = path.read_bytes()
    model = create_model("resnet8", 10)
    with pytest.raises(MixkdError, match=f"cannot write {path}: File too large"):
        save_checkpoint(path, model, model_name="resnet8", num_classes=10, epoch=2)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    with pytest.raises(MixkdError, match="cannot write .*big.txt"):
        atomic_write_text(tmp_path / "big.txt", "x" * 100_000)


# ---- pickles that hold code, deflate bombs --------------------------------------------------

class _Code:
    """What a hostile .pth pickles: a call of os.system (never made: the test fails if it runs)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_holds_code_is_refused_as_such_without_unsafe_advice_or_warnings(tmp_path, capsys):
    import pickle
    import warnings

    from mixkd.cli import main

    marker = tmp_path / "ran"
    torch.save({"model": _Code(marker)}, tmp_path / "zip.pth")  # torch's zip format
    with open(tmp_path / "raw.pth", "wb") as f:  # a raw pickle (protocol 4: torch warns about it)
        pickle.dump({"model": _Code(marker)}, f)
    for name in ("zip.pth", "raw.pth"):
        with warnings.catch_warnings(record=True) as heard:
            warnings.simplefilter("always")
            with pytest.raises(MixkdError) as refused:
                load_checkpoint(tmp_path / name)
        assert str(refused.value) == (f"checkpoint {tmp_path / name} holds code, not only weights (it calls "
                                      "posix.system): refused; mixkd never unpickles code: ask for the weights as a "
                                      "state_dict or a .safetensors file")
        assert [str(w.message) for w in heard] == []
    common = ["--dataset", "digits", "--device", "cpu"]
    for argv in (["eval", str(tmp_path / "raw.pth"), "--model", "resnet8", *common],
                 ["distill", "--teacher", str(tmp_path / "zip.pth"), "--teacher-model", "resnet8", "--model", "resnet8",
                  "--epochs", "1", "--no-progress", "--out", str(tmp_path / "student"), *common]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "holds code, not only weights" in err and "weights_only" not in err, err
    assert not marker.exists() and not (tmp_path / "student").exists()


def test_a_damaged_pth_is_one_line_without_torchs_advice_to_load_it_unsafely(tmp_path):
    import pickle

    with open(tmp_path / "odd.pth", "wb") as f:  # no code, but a type torch's weights-only loader refuses
        pickle.dump({"model": {"w": torch.zeros(1)}, "when": __import__("datetime").date(2026, 1, 1)}, f)
    with pytest.raises(MixkdError, match="calls datetime.date"):
        load_checkpoint(tmp_path / "odd.pth")
    (tmp_path / "cut.pth").write_bytes(b"\x80\x02}q\x00(X")  # a pickle cut short
    with pytest.raises(MixkdError, match=r"cut.pth is corrupt, truncated or not a weights file \(") as cut:
        load_checkpoint(tmp_path / "cut.pth")
    assert "weights_only" not in str(cut.value) and "\n" not in str(cut.value)


def _rezipped(src, dst, method):
    """``src`` (a torch zip) with every record stored with ``method`` (as an archiver would)."""
    import zipfile

    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w", method) as b:
        for info in a.infolist():
            b.writestr(info.filename, a.read(info.filename), compress_type=method)


def test_a_deflate_bomb_is_refused_before_anything_is_inflated(tmp_path, monkeypatch):
    import zipfile

    import mixkd.checkpoint as checkpoint

    torch.save({"w": torch.zeros(2**20)}, tmp_path / "plain.pth")  # 4 MiB of zeros: deflates about 1000:1
    _rezipped(tmp_path / "plain.pth", tmp_path / "bomb.pth", zipfile.ZIP_DEFLATED)
    record = next(i for i in zipfile.ZipFile(tmp_path / "bomb.pth").infolist() if i.filename.endswith("data/0"))
    assert record.file_size == 4 * 2**20 and record.compress_size < 2**20 // checkpoint.MAX_INFLATION
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load inflated the bomb"))
    with pytest.raises(MixkdError, match=rf"bomb.pth is not a weights file: its record plain/data/0 would inflate from "
                                         rf"{record.compress_size:,} to 4,194,304 bytes \([\d,]+:1; torch.save stores "
                                         r"weights uncompressed\); refused before inflating it"):
        load_checkpoint(tmp_path / "bomb.pth")
    monkeypatch.undo()
    torch.manual_seed(0)
    torch.save({"w": torch.randn(2**19)}, tmp_path / "random.pth")  # weights deflate by a few percent: they load
    _rezipped(tmp_path / "random.pth", tmp_path / "deflated.pth", zipfile.ZIP_DEFLATED)
    assert torch.equal(load_checkpoint(tmp_path / "deflated.pth").state_dict["w"], torch.load(tmp_path / "random.pth")["w"])
    monkeypatch.setattr(checkpoint, "available_memory", lambda: 2**20)  # a machine with 1 MiB free
    with pytest.raises(MixkdError, match=r"random.pth would take 2.0 MiB once read, more than the 1.0 MiB of memory "
                                         r"available; refused before reading it"):
        load_checkpoint(tmp_path / "random.pth")


# ---- writes never follow symbolic links ------------------------------------------------------

def _planted(tmp_path, name, folder="received"):
    """A symbolic link ``name`` in a received folder, pointing at a file of the user's."""
    victim = tmp_path / f"victim-{name}"
    victim.write_text("precious\n")
    folder = tmp_path / folder
    folder.mkdir(exist_ok=True)
    (folder / name).symlink_to(victim)
    return folder / name, victim


def test_atomic_writes_replace_a_link_never_its_target(tmp_path):
    link, victim = _planted(tmp_path, "result.json")
    atomic_write_text(link, "{}\n")
    assert victim.read_text() == "precious\n" and not link.is_symlink() and link.read_text() == "{}\n"
    link, _ = _planted(tmp_path, "tsne.npz")
    atomic_write(link, lambda tmp: open(tmp, "wb").write(b"x"))
    assert victim.read_text() == "precious\n" and not link.is_symlink()


def test_appends_and_locks_refuse_a_link(tmp_path):
    link, victim = _planted(tmp_path, "log.txt")
    with pytest.raises(MixkdError, match="is a symbolic link"):
        append_text(link, "a line\n")
    with pytest.raises(MixkdError, match="is a symbolic link"):
        open_nofollow(link, "a+")
    assert victim.read_text() == "precious\n"
    append_text(tmp_path / "fresh.txt", "one\n")
    append_text(tmp_path / "fresh.txt", "two\n")
    assert (tmp_path / "fresh.txt").read_text() == "one\ntwo\n"
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "fresh.txt").st_mode & 0o777 == 0o666 & ~mask


def test_analysis_pictures_and_embeddings_replace_links(tmp_path):
    from mixkd.analysis import plots
    from mixkd.analysis.tsne import save_embedding

    png, victim = _planted(tmp_path, "reliability.png")
    cal = {"ece": 0.1, "calibration": {"bin_edges": [0.0, 0.5, 1.0], "bin_accuracy": [0.2, 0.8],
                                       "bin_confidence": [0.3, 0.7], "bin_count": [5, 5]}}
    plots.reliability_diagram({"student": cal}, png)
    npz, _ = _planted(tmp_path, "tsne.npz")
    save_embedding(npz, torch.zeros(3, 2).numpy(), torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7]), ["a", "b", "c"], "t")
    assert victim.read_text() == "precious\n"
    assert png.read_bytes().startswith(b"\x89PNG") and npz.read_bytes().startswith(b"PK")
    assert sorted(p.name for p in png.parent.iterdir()) == ["reliability.png", "tsne.npz"]  # no temporary left


def test_study_report_files_replace_links(tmp_path):
    import yaml

    from mixkd.study import write_report

    out = tmp_path / "received"
    run = out / "teachers" / "resnet8_plain-s0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "train", "model": "resnet8", "dataset": "digits"}))
    (run / "result.json").write_text(json.dumps({"top1": 50.0, "best_top1": 51.0}))
    victims = []
    for name in ("report.md", "results.csv"):
        link, victim = _planted(tmp_path, name)
        victims.append(victim)
    write_report(out)
    assert [v.read_text() for v in victims] == ["precious\n"] * 2
    assert not (out / "report.md").is_symlink() and "resnet8" in (out / "results.csv").read_text()


def test_study_locks_refuse_links(tmp_path):
    from mixkd.study.folder import LOCK_NAME, WORKERS_LOCK, FolderLock

    for name in (LOCK_NAME, WORKERS_LOCK):
        folder = tmp_path / name
        folder.mkdir()
        victim = tmp_path / f"{name}.victim"
        victim.write_text("precious\n")
        (folder / name).symlink_to(victim)
        with pytest.raises(MixkdError, match="is a symbolic link"), FolderLock(folder, wait_for_workers=0.1):
            pass
        assert victim.read_text() == "precious\n"


def test_a_run_replaces_a_linked_config_and_refuses_a_linked_log(tmp_path, one_thread):
    from mixkd.config import build_config
    from mixkd.engine import Run

    config, config_victim = _planted(tmp_path, "config.yaml", folder="run")
    log, log_victim = _planted(tmp_path, "log.txt", folder="run")
    cfg = build_config(flags={"task": "train", "model": "resnet8", "dataset": "digits", "epochs": 1, "batch_size": 128,
                              "device": "cpu", "progress": False, "out": str(config.parent)})
    job = Run(cfg)
    with pytest.raises(MixkdError, match="log.txt is a symbolic link"):
        job.advance()
    assert config_victim.read_text() == log_victim.read_text() == "precious\n"
    assert not config.is_symlink() and "resnet8" in config.read_text()


def _planted_folder(tmp_path, name, folder="received"):
    """A symbolic link ``name`` in a received folder, pointing at a folder of the user's."""
    victim = tmp_path / f"victim-{name}"
    victim.mkdir()
    (tmp_path / folder).mkdir(exist_ok=True)
    (tmp_path / folder / name).symlink_to(victim)
    return tmp_path / folder / name, victim


def test_a_run_refuses_a_linked_tensorboard_folder_and_a_study_run_folder_that_is_a_link(tmp_path, one_thread):
    from mixkd.config import build_config
    from mixkd.engine import Run
    from mixkd.errors import LinkRefused

    board, victim = _planted_folder(tmp_path, "tensorboard", folder="run")
    flags = {"task": "train", "model": "resnet8", "dataset": "digits", "epochs": 1, "batch_size": 128,
             "device": "cpu", "progress": False, "tensorboard": True, "out": str(board.parent)}
    job = Run(build_config(flags=flags))
    with pytest.raises(LinkRefused, match=r"run/tensorboard is a symbolic link; mixkd does not write through links"):
        job.advance()
    assert list(victim.iterdir()) == [] and board.is_symlink()
    run_dir, victim = _planted_folder(tmp_path, "resnet8_plain-s0", folder="study")  # a study's run folder
    with pytest.raises(LinkRefused, match="resnet8_plain-s0 is a symbolic link"):
        Run(build_config(flags={**flags, "tensorboard": False, "out": str(run_dir)}), paths_relative_to_run=True)
    assert list(victim.iterdir()) == []


def test_folders_mixkd_names_refuse_links_and_their_parents_may_be_links(tmp_path):
    from mixkd.errors import LinkRefused
    from mixkd.files import make_dir
    from mixkd.step import set_compile_cache
    from mixkd.study.worker import LazyLog, record_failure

    cache, victim = _planted_folder(tmp_path, ".compile-cache")
    with pytest.raises(LinkRefused, match="compile-cache is a symbolic link"):
        set_compile_cache(cache)
    run_dir, _ = _planted_folder(tmp_path, "run-a")
    with pytest.raises(LinkRefused):
        record_failure(run_dir, "failed", None)
    with pytest.raises(LinkRefused):
        LazyLog(run_dir / "log.txt").write("a line\n")
    assert list(victim.iterdir()) == [] and list((tmp_path / "victim-run-a").iterdir()) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "user-link").symlink_to(tmp_path / "mine")  # a folder the user names may be a link
    assert make_dir(tmp_path / "user-link" / "logs") == tmp_path / "user-link" / "logs"
    assert (tmp_path / "mine" / "logs").is_dir()


def test_a_study_with_a_linked_worker_log_stops_in_one_line_and_fails_no_run(tmp_path):
    from mixkd.errors import LinkRefused
    from mixkd.study import load_study, run_study
    from mixkd.study.executors import LocalExecutor

    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\ndefaults: {dataset: digits, device: cpu, epochs: 1}\n"
                    "teachers: [{name: plain, models: resnet8}]\n")
    out = tmp_path / "s"
    out.mkdir()
    log, victim = _planted(tmp_path, "worker-0.log", folder="s/logs")
    executor = LocalExecutor(workers=1, use_gpu=False, lock_dir=str(out))
    with pytest.raises(LinkRefused, match=r"logs/worker-0.log is a symbolic link"):
        run_study(load_study(spec), out, executor, progress=False, echo=lambda *_: None)
    assert executor.pids() == [] and victim.read_text() == "precious\n"  # no worker started
    runs = json.loads((out / "study-state.json").read_text())["runs"]
    assert [r["status"] for r in runs.values()] == ["pending"]  # nothing marked failed


# ---- time limits on the monotonic clock ------------------------------------------------------

def test_a_wall_clock_set_back_does_not_move_the_deadline(monkeypatch):
    import time

    from mixkd.control import StopControl, wall_to_monotonic

    control = StopControl(10**6)  # counted from the start of the process
    before = control.remaining()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600.0)  # NTP or an admin sets the clock back an hour
    assert 10**6 - 7200 < control.remaining() <= before <= 10**6
    monkeypatch.setattr(time, "time", real)
    wall = control.wall_deadline()  # sent to another machine, converted back there
    assert abs(wall_to_monotonic(wall) - control.deadline) < 1.0


def test_a_studys_workers_stop_before_the_study_so_that_its_own_exit_fits():
    from mixkd.control import StopControl

    control = StopControl(300.0)
    assert control.deadline - control.inner_deadline() == pytest.approx(1.0 + 0.02 * 300)
    control = StopControl(3600.0)
    assert control.deadline - control.inner_deadline() == pytest.approx(10.0)
    assert StopControl().inner_deadline() is None


# ---- every number in range, every file read safely, checked before anything runs --------------

@pytest.mark.parametrize("flags, words", [
    (["--seed", str(2**70)], "seed: Input should be less than or equal to 9223372036854775807"),
    (["-T", "1e-320"], "kd.temperature: Input should be greater than or equal to 0.01"),
    (["--mix-alpha", "0"], "mix.alpha: Input should be greater than or equal to 0.001"),
])
def test_numbers_out_of_range_are_one_line_before_anything_runs(tmp_path, capsys, flags, words):
    from mixkd.cli import main

    out = tmp_path / "never"
    code = main(["distill", "--teacher", str(tmp_path), "--student", "resnet8", "--dataset", "digits", "--out", str(out),
                 *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not out.exists()


def test_every_numeric_flag_shows_its_range_in_help():
    from mixkd.cli import RUN_OPTIONS, build_parser
    from mixkd.config import value_range

    numeric = [key for _, key, kwargs, _ in RUN_OPTIONS if kwargs.get("type") in (int, float)]
    assert numeric and all(value_range(k) for k in numeric), [k for k in numeric if not value_range(k)]
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "(valid: [0, 9223372036854775807])" in " ".join(text.split())


def test_study_counts_are_checked_before_anything_starts(tmp_path, capsys):
    from mixkd.cli import main

    for flag in ("--pack", "--workers", "--threads"):
        code = main(["study", "run", "configs/studies/quickstart.yaml", "--out", str(tmp_path / "s"), flag, "0"])
        assert code == 2 and capsys.readouterr().err.strip() == f"mixkd: error: {flag} must be at least 1, got 0"
    code = main(["study", "run", "configs/studies/quickstart.yaml", "--out", str(tmp_path / "s"),
                 "--set", "dataset=cifar10", "--set", f"data_dir={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "dataset 'cifar10' not found" in err
    assert not (tmp_path / "s").exists()


def test_cuda_without_a_gpu_stops_a_study_up_front(tmp_path, capsys, monkeypatch):
    from mixkd.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["study", "run", "configs/studies/quickstart.yaml", "--out", str(tmp_path / "s"), "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("mixkd: error: device 'cuda' asked for, but CUDA is not available here; "
                                 "use --device cpu (or auto)")
    assert not (tmp_path / "s").exists()


def test_repeated_keys_and_alias_bombs_are_refused(tmp_path):
    from mixkd.config import read_yaml
    from mixkd.study import load_study

    (tmp_path / "twice.yaml").write_text("epochs: 2\nseed: 1\nepochs: 3\n")
    with pytest.raises(MixkdError, match=r"twice.yaml line 3 is not valid YAML: key 'epochs' is given twice \(lines 1 and 3\)"):
        read_yaml(tmp_path / "twice.yaml")
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")  # 9**9 values: about 390 million
    assert len((tmp_path / "bomb.yaml").read_bytes()) < 1000
    with pytest.raises(MixkdError, match="bomb.yaml expands to more than 100,000 values through YAML aliases"):
        load_study(tmp_path / "bomb.yaml")
    (tmp_path / "anchors.yaml").write_text("base: &b {epochs: 2}\nother: *b\n")  # modest aliases still work
    assert read_yaml(tmp_path / "anchors.yaml") == {"base": {"epochs": 2}, "other": {"epochs": 2}}


def test_a_seed_out_of_range_in_a_study_file_is_refused_at_load(tmp_path):
    from mixkd.study import load_study

    (tmp_path / "s.yaml").write_text("name: s\ndefaults: {dataset: digits, epochs: 1}\n"
                                     f"teachers:\n  - {{name: plain, models: resnet8, seeds: [{2**70}]}}\n")
    with pytest.raises(MixkdError, match="less than or equal to 9223372036854775807"):
        load_study(tmp_path / "s.yaml")


# ---- workers die with their parent ------------------------------------------------------------

def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for its reaper counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_worker_whose_parent_dies_while_it_starts_exits_and_frees_the_folder(tmp_path):
    import fcntl
    import subprocess
    import sys
    import time

    from mixkd.study.folder import WORKERS_LOCK

    script = ("import os, sys\nfrom mixkd.study.executors import LocalExecutor\n"
              "ex = LocalExecutor(workers=1, use_gpu=False, lock_dir=sys.argv[1])\n"
              "ex._start(0)\nprint(ex._procs[0].pid, flush=True)\n"
              "os.kill(os.getpid(), 9)  # the study's main process dies (kill -9) while its worker starts\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    worker = int(proc.stdout.split()[0])
    for _ in range(600):  # until it has left (at most a minute: it must not live on)
        if _gone(worker):
            break
        time.sleep(0.1)
    assert _gone(worker), f"worker {worker} outlived its parent"
    with open(tmp_path / WORKERS_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody holds the folder any more


def test_the_message_about_live_workers_names_their_pids(tmp_path):
    import fcntl

    from mixkd.study.folder import WORKERS_LOCK, FolderLock

    holder = os.fork()
    if holder == 0:  # a worker of an earlier study run, still holding the folder
        with open(tmp_path / WORKERS_LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(0)
    try:
        while not os.waitpid(holder, os.WUNTRACED)[1]:
            pass
        with pytest.raises(MixkdError, match=rf"still work in {tmp_path} \(PIDs {holder}\); .*: kill {holder}$"), \
                FolderLock(tmp_path, wait_for_workers=0.1):
            pass
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)


# ---- a damaged metrics.jsonl -------------------------------------------------------------------

def _run_at_epoch(tmp_path, epoch: int, lines: list[str] | None):
    """A digits run folder whose checkpoint has done ``epoch`` epochs and whose metrics.jsonl holds
    ``lines`` (None: no file)."""
    from mixkd.config import build_config

    out = tmp_path / "run"
    out.mkdir()
    cfg = build_config(flags={"task": "train", "model": "resnet8", "dataset": "digits", "epochs": 4, "batch_size": 128,
                              "device": "cpu", "progress": False, "out": str(out)})
    (out / "config.yaml").write_text(cfg.to_yaml())
    model = create_model("resnet8", 10)
    save_checkpoint(out / "checkpoint.safetensors", model, model_name="resnet8", num_classes=10, epoch=epoch,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                    rng={"torch_cpu": torch.get_rng_state()})
    if lines is not None:
        (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return cfg


def _row(epoch):
    return json.dumps({"epoch": epoch, "lr": 0.05, "test_top1": 10.0 * epoch, "test_top5": 50.0, "test_nll": 2.0})


@pytest.mark.parametrize("lines, kept, warned", [
    (["{garbage", _row(2), _row(3)], [2, 3], ["line(s) 1 are damaged", "lacks epoch(s) 1 of the 3"]),
    (["5", _row(1), _row(2), _row(3)], [1, 2, 3], ["line(s) 1 are damaged"]),
    (None, [], ["lacks epoch(s) 1, 2, 3 of the 3"]),
])
def test_a_damaged_metrics_file_keeps_what_it_can_and_says_so(tmp_path, one_thread, lines, kept, warned):
    from mixkd.engine import Run

    cfg = _run_at_epoch(tmp_path, 3, lines)
    job = Run(cfg, resume=True)
    job.start()
    assert [r["epoch"] for r in job.history] == kept
    assert len(job.notes) == len(warned) and all(w in n for w, n in zip(warned, job.notes, strict=True)), job.notes
    job.advance()  # the first write: the warnings go to log.txt (and the terminal)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert all(w in log for w in warned)


# ---- damaged files received from others: one line naming the file -----------------------------

def test_a_damaged_result_json_is_one_line_naming_it(tmp_path):
    from mixkd.engine import Run

    cfg = _run_at_epoch(tmp_path, 3, [_row(1), _row(2), _row(3)])
    (tmp_path / "run" / "result.json").write_text("{bad")
    with pytest.raises(MixkdError, match=r"run/result.json is damaged \(not valid JSON: .*\); delete it and run the same"):
        Run(cfg, resume=True).start()


def test_a_study_folder_with_a_broken_run_config_or_state_names_the_file(tmp_path):
    import yaml

    from mixkd.study import load_study, write_report
    from mixkd.study.runner import check_run

    study_file = tmp_path / "s.yaml"
    study_file.write_text("name: s\ndefaults: {dataset: digits, epochs: 1}\nteachers:\n  - {name: plain, models: resnet8}\n"
                          "students:\n  - {teachers: [plain], models: resnet8, methods: [kd]}\n")
    study, out = load_study(study_file), tmp_path / "out"
    teacher = out / study.runs[0].id
    teacher.mkdir(parents=True)
    (teacher / "config.yaml").write_text("model: [resnet8\n")
    with pytest.raises(MixkdError, match=f"run config {teacher / 'config.yaml'} line 2 is not valid YAML"):
        check_run(study.runs[0], out)  # what study run and status ask of every run
    (teacher / "config.yaml").write_text(yaml.safe_dump({"task": "train", "model": "resnet8", "dataset": "digits"}))
    (teacher / "result.json").write_text(json.dumps({"top1": 50.0, "best_top1": 50.0}))
    (out / "study-state.json").write_text('{"format": "mixkd-study-1", "runs": {"teach')  # cut short
    with pytest.raises(MixkdError, match=r"study-state.json is damaged \(not valid JSON"):
        write_report(out)


# ---- newcomer papercuts ------------------------------------------------------------------------

def test_models_are_listed_in_natural_order(capsys):
    from mixkd.cli import main

    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    resnets = [n for n in names if n.startswith("resnet") and n[6:].isdigit()]
    assert resnets == ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]


def test_a_short_run_says_when_its_default_milestones_collide():
    from mixkd.config import build_config

    assert build_config(overrides=["epochs=3"]).milestone_note() == (
        "note: with 3 epochs the default milestones are [2, 2, 3] (62.5/75/87.5% of the run, rounded): the lr of "
        "each epoch is x1, x1, x0.01 the base lr; set --milestones to choose")
    assert build_config(overrides=["epochs=240"]).milestone_note() is None
    assert build_config(overrides=["epochs=3", "optim.milestones=[2,2]"]).milestone_note() is None  # chosen


def test_a_finished_study_points_at_its_report_when_there_is_one(tmp_path):
    from mixkd.study.plan import finished_line

    assert finished_line(tmp_path) == f"every run is finished; write the report with: mixkd study report {tmp_path}"
    (tmp_path / "report.md").write_text("# report\n")
    assert finished_line(tmp_path) == f"every run is finished; the report is {tmp_path / 'report.md'}"


def test_a_run_stopped_by_its_time_limit_says_so(tmp_path, one_thread):
    from mixkd.config import build_config
    from mixkd.engine import Run

    cfg = build_config(flags={"task": "train", "model": "resnet8", "dataset": "digits", "epochs": 1, "batch_size": 128,
                              "device": "cpu", "progress": False, "out": str(tmp_path / "r")})
    job = Run(cfg)
    job.advance()
    job.stop("time")
    assert "stopped on time at epoch 1 step 1/" in (tmp_path / "r" / "log.txt").read_text()


def test_no_error_files_are_mentioned_when_nothing_failed(tmp_path):
    from mixkd.study.cli import summary_line

    ok = {"done": 3, "failed": 0, "blocked": 0}
    assert summary_line("s", tmp_path, ok) == "study s: 3 finished, 0 failed, 0 blocked"
    assert "error.txt" in summary_line("s", tmp_path, {**ok, "failed": 1})


def test_distilling_from_an_unfinished_teacher_warns(tmp_path, one_thread):
    from mixkd.config import build_config
    from mixkd.engine import Run

    _run_at_epoch(tmp_path, 2, [_row(1), _row(2)])  # a teacher stopped at epoch 2 of 4: optimizer state kept
    cfg = build_config(flags={"task": "distill", "kd.teacher": str(tmp_path / "run"), "model": "resnet8",
                              "dataset": "digits", "epochs": 1, "batch_size": 128, "device": "cpu", "progress": False,
                              "out": str(tmp_path / "student")})
    job = Run(cfg)
    job.start()
    assert [n for n in job.notes if "unfinished run (epoch 2 of 4)" in n], job.notes
    finished = tmp_path / "finished.safetensors"
    save_checkpoint(finished, create_model("resnet8", 10), model_name="resnet8", num_classes=10, epoch=4)
    job = Run(cfg.model_copy(update={"kd": cfg.kd.model_copy(update={"teacher": str(finished)}),
                                     "out": str(tmp_path / "student2")}))
    job.start()
    assert not [n for n in job.notes if "unfinished" in n]


def test_the_wheel_ships_every_package_and_the_configs():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "mixkd").rglob("__init__.py")}
    assert found | {"mixkd.configs"} == set(tool["packages"])  # a new subpackage must be listed there
    assert tool["package-dir"]["mixkd.configs"] == "configs" and tool["package-data"]["mixkd.configs"] == ["*/*.yaml"]
    assert (root / "configs" / "studies" / "quickstart.yaml").is_file()


def test_a_ctrl_c_while_a_worker_starts_does_not_kill_it(tmp_path):
    from mixkd.study.executors import LocalExecutor

    ex = LocalExecutor(workers=1, use_gpu=False, lock_dir=str(tmp_path))
    ex._start(0)
    os.kill(ex._procs[0].pid, signal.SIGINT)  # the terminal's Ctrl-C reaches the whole process group
    ex._tasks[0].put(None)  # no work: close
    ex._procs[0].join(120)
    assert ex._procs[0].exitcode == 0


def test_a_read_only_folder_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import errno

    from mixkd.files import check_writable

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    with pytest.raises(MixkdError, match=r"cannot write .*analysis.json: Read-only file system; the file system is read-only"):
        atomic_write(tmp_path / "analysis.json", read_only)
    monkeypatch.setattr("tempfile.mkstemp", read_only)  # as on a read-only mount: nothing can be created there
    with pytest.raises(MixkdError, match=f"cannot write {tmp_path}: Read-only file system"):
        check_writable(tmp_path)


def test_default_run_folders_of_commands_started_in_the_same_second_differ(monkeypatch):
    from mixkd.config import build_config
    from mixkd.run_folder import default_run_dir

    cfg = build_config(overrides=["dataset=digits"])
    names = set()
    for pid in (4242, 4243):  # two commands in the same second: two processes
        monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
        names.add(default_run_dir(cfg).name)
    assert len(names) == 2 and all(n.startswith("train-resnet8x4-digits-") for n in names)


def test_a_stop_before_the_first_write_says_nothing_was_written(tmp_path, capsys, monkeypatch, one_thread):
    from mixkd.cli import main
    from mixkd.control import StopControl

    def signalled(self, next_cost=0.0):  # SIGTERM arrived while the run was being built
        self.request("signal")
        return True

    monkeypatch.setattr(StopControl, "should_stop", signalled)
    out = tmp_path / "never"
    code = main(["train", "--model", "resnet8", "--dataset", "digits", "--epochs", "1", "--device", "cpu",
                 "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 75 and err == (f"stopped by a signal before the run began: nothing was written to {out}; run the "
                                  "same command again to start it")
    assert not out.exists()
