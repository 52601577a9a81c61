"""KD methods from outside the package (issue 27): the README's plugin file and commands, run exactly as
written; its settings as flags and keys; what the run records; a study with it (plan, run, report,
claims) and that study moved to another folder, with the same plugin file and with another one."""

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mixkd import registry
from mixkd.cli import build_parser, main
from mixkd.config import build_config
from mixkd.errors import MixkdError
from mixkd.registry import KD_METHODS

README = Path(__file__).parents[1] / "README.md"


def readme_plugin() -> tuple[str, list[str]]:
    """The README's "A new KD method": its plugin file and its commands."""
    text = README.read_text()
    section = text[text.index("## A new KD method"):].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)
    commands = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(code) == 1 and len(commands) == 1
    return code[0], commands[0].replace("\\\n", " ").strip().splitlines()


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """The README's plugin file saved as my_at.py and its commands run, as written, in a fresh folder."""
    import os

    root = tmp_path_factory.mktemp("readme")
    code, commands = readme_plugin()
    (root / "my_at.py").write_text(code)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for line in commands:
            argv = shlex.split(line)
            assert argv[0] == "mixkd"
            assert main(argv[1:] + ["--no-progress", "--device", "cpu"]) == 0, line
    finally:
        os.chdir(cwd)
    yield root
    unload_my_at()


def unload_my_at() -> None:
    """Forget every my_at.py loaded (as a fresh process on another machine would know none)."""
    for plugin in registry.loaded_plugins():
        if plugin.path.endswith("my_at.py"):
            registry.unload_plugin(plugin)


def test_the_readme_plugin_is_at_most_40_lines_and_its_commands_run(readme_run):
    code, _ = readme_plugin()
    assert len(code.strip().splitlines()) <= 40
    result = json.loads((readme_run / "runs" / "at-student" / "result.json").read_text())
    digest = hashlib.sha256((readme_run / "my_at.py").read_bytes()).hexdigest()
    assert result["kd_method"] == "my_at" and result["plugins"] == [
        {"path": str((readme_run / "my_at.py").resolve()), "sha256": digest}]
    row = json.loads((readme_run / "runs" / "at-student" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train_kd"] > 0 and row["train_loss"] == pytest.approx(row["train_ce"] + 1000 * row["train_kd"], rel=1e-4)
    saved = yaml.safe_load((readme_run / "runs" / "at-student" / "config.yaml").read_text())
    assert saved["plugins"] == [str((readme_run / "my_at.py").resolve())]
    assert saved["kd"] == {"teacher": saved["kd"]["teacher"], "teacher_model": None, "teacher_input": "auto", "method": "my_at", "p": 2.0,
                           "ce_weight": 1.0, "feat_weight": 1000.0}


def test_a_fresh_process_reloads_the_plugin_from_the_saved_config(readme_run):
    code = ("from mixkd.config import load_run_config; c = load_run_config('runs/at-student/config.yaml'); "
            "print(c.kd.method, c.kd.settings().p)")
    out = subprocess.run([sys.executable, "-c", code], cwd=readme_run, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "my_at 2.0", out.stderr


def test_its_settings_are_flags_validated_like_a_builtin_methods(readme_run):
    help_text = build_parser()._subparsers._group_actions[0].choices["distill"].format_help()
    assert "--kd my_at: attention transfer (plugin) [plugin" in help_text and "--feat-weight FEAT_WEIGHT" in help_text
    flags = {"task": "distill", "kd.method": "my_at", "kd.teacher": "t.pth"}
    assert build_config(flags={**flags, "kd.p": 4}).kd.params() == {"p": 4.0, "ce_weight": 1.0, "feat_weight": 1000.0}
    with pytest.raises(MixkdError) as err:
        build_config(flags={**flags, "kd.p": 0})
    assert str(err.value) == "invalid config: kd.p: Input should be greater than 0 (got 0)"
    with pytest.raises(MixkdError) as err:
        build_config(flags={**flags, "kd.temperature": 4})
    assert str(err.value) == ("invalid config: kd.temperature: the my_at KD method does not use it (it uses kd.p, "
                              "kd.ce_weight, kd.feat_weight); remove it")


def test_a_missing_plugin_file_is_one_line(tmp_path, capsys):
    code = main(["distill", "--plugin", str(tmp_path / "nope.py"), "--kd", "x", "--teacher", "t.pth"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"mixkd: error: plugin {tmp_path / 'nope.py'}: no such file")


def test_a_study_with_the_plugin_runs_reports_checks_claims_and_refuses_another_plugin_file_when_moved(
        readme_run, tmp_path, capsys):
    work = readme_run
    study = {"name": "plugged", "plugins": ["my_at.py"],
             "defaults": {"dataset": "digits", "epochs": 1, "batch_size": 512, "device": "cpu"},
             "teachers": [{"name": "given", "checkpoint": str(work / "runs" / "at-teacher"), "model": "resnet8"}],
             "students": [{"teachers": "given", "models": "resnet8", "methods": ["alone", "my_at_pmu"]}]}
    (work / "study.yaml").write_text(yaml.safe_dump(study))
    out = work / "out"
    assert main(["study", "plan", str(work / "study.yaml"), "--out", str(out)]) == 0
    assert main(["study", "run", str(work / "study.yaml"), "--out", str(out), "--workers", "1", "--pack", "3",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "MyAT > student alone" in printed, printed  # claim 4 for the plugin's method
    assert "MyAT+PMU" in (out / "report.md").read_text()
    state = json.loads((out / "study-state.json").read_text())
    digest = hashlib.sha256((work / "my_at.py").read_bytes()).hexdigest()
    assert {r["plugins"][0]["sha256"] for r in state["runs"].values()} == {digest}

    # moved, with its plugin file as it was: nothing to run again
    moved = tmp_path / "b"
    shutil.copytree(work, moved)
    unload_my_at()
    assert main(["study", "run", str(moved / "study.yaml"), "--out", str(moved / "out"), "--no-progress",
                 "--no-report"]) == 0
    # moved, with another plugin file of that name: refused in one line
    other = tmp_path / "c"
    shutil.copytree(work, other)
    unload_my_at()
    (other / "my_at.py").write_text((work / "my_at.py").read_text() + "# edited\n")
    capsys.readouterr()
    assert main(["study", "run", str(other / "study.yaml"), "--out", str(other / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"but {(other / 'my_at.py').resolve()} has" in err[0], err
    assert KD_METHODS.get("my_at").source == str((other / "my_at.py").resolve())
