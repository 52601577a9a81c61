"""``mixkd study plan | run | status | report``: the command-line side of studies."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mixkd.control import StopControl, parse_duration
from mixkd.errors import MixkdError
from mixkd.run_folder import ANALYSIS_ERROR_NAME, ERROR_NAME, RESULT_NAME

# The study's modules (torch among their imports) load in the commands, not with the parser: building
# mixkd's parser must stay light (``mixkd claims`` imports no torch).

DEFAULT_ROOT = Path("runs")


PLUGIN_HELP = ("a plugin: a .py file or importable module registering KD methods of your own (added to the study "
               "file's plugins:; repeatable); its SHA-256 is recorded for each run")


def add_study_parser(sub) -> None:
    study = sub.add_parser("study", help="grids of runs from one study file: plan, run, status, report",
                           description="Run a whole study (teachers, then students over methods, temperatures, "
                                       "mix fractions and seeds) from one YAML file; see configs/studies/.")
    commands = study.add_subparsers(dest="study_command", metavar="STUDY_COMMAND", required=True)
    over = {"action": "append", "dest": "overrides", "metavar": "KEY=VALUE", "default": [],
            "help": "set a run setting in every run, e.g. --set data_dir=/data --set epochs=2 (repeatable)"}

    p = commands.add_parser("plan", help="list the runs a study file expands to, with estimated compute",
                            description="Print the number of runs, a table of them with their status in the study "
                                        "folder, and the compute they need, estimated from finished runs' throughput.")
    p.add_argument("file", help="study file (YAML)")
    p.add_argument("--out", help="study folder (default: runs/<study name>)")
    p.add_argument("--pack", type=int, metavar="K", help="also estimate 'mixkd study run --pack K' (K runs in one "
                                                           "process) on one H100, from measured figures")
    p.add_argument("--set", **over)
    p.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="FILE", help=PLUGIN_HELP)
    p.set_defaults(handler=cmd_plan)

    p = commands.add_parser("run", help="run every unfinished run of a study (teachers first), then report",
                            description="Run a study into a folder of run directories. Idempotent: finished runs are "
                                        "skipped, interrupted ones resumed, failed ones retried. Ctrl-C stops cleanly.")
    p.add_argument("file", help="study file (YAML)")
    p.add_argument("--out", help="study folder (default: runs/<study name>); with Ray, on storage every node shares")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local worker processes (default) or Ray actors (one pack per GPU of the cluster)")
    p.add_argument("--pack", "--runs-per-gpu", dest="pack", type=int, metavar="K",
                   help="runs trained together in one process (a pack), each on its own CUDA stream: K runs share "
                        "a GPU far better than K processes (default: 8 on a GPU, 1 on the CPU). Image-folder runs, "
                        "whose data streams from disk, run in a pack of their own")
    p.add_argument("--workers", type=int, help="worker processes, each holding a pack (local default: one per GPU, "
                                               "or min(cores / --threads, 4) on the CPU; Ray default: one per GPU, "
                                               "or per CPU of a CPU-only cluster)")
    p.add_argument("--threads", type=int, help="CPU threads of each CPU worker (default: 1; recorded in each "
                                               f"{RESULT_NAME}: CPU results are bit-exact for the same thread count)")
    p.add_argument("--time-limit", metavar="DURATION",
                   help="stop before DURATION (90s, 25m, 1:30:00) of wall time: every running run writes a "
                        "step-exact checkpoint and the command exits with status 75; run it again to continue. "
                        "SIGTERM/SIGUSR1 do the same (SLURM's --signal)")
    p.add_argument("--address", help="Ray cluster address (default: start Ray on this machine)")
    p.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="FILE", help=PLUGIN_HELP)
    p.add_argument("--device", help="device for every run, overriding the study file: auto, cpu, cuda")
    p.add_argument("--no-progress", action="store_true", help="print one line per finished run instead of a progress bar (the default when stderr is not a terminal)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--track", choices=["none", "mlflow", "wandb"],
                   help="log the study to an experiment tracker: a parent run with a child per run (the same as "
                        "--set track.backend=...; track.uri and track.project with --set)")
    p.add_argument("--set", **over)
    p.set_defaults(handler=cmd_run, stops=True)

    p = commands.add_parser("status", help="where a study folder stands: one line per run, totals, compute left",
                            description="One line per run of a study folder (done with its top-1, running, stopped on "
                                        "time at epoch e step s, failed with its reason, waiting for its teacher, "
                                        "pending), the totals, and the compute left estimated from the throughput its "
                                        "finished runs measured. Reads the folder alone (its study.yaml); changes "
                                        "nothing.")
    p.add_argument("dir", help="study folder")
    p.set_defaults(handler=cmd_status)

    p = commands.add_parser("report", help="write results.csv and report.md (table and figures) for a study folder",
                            description="Write results.csv (one row per run) and report.md with PNG figures.")
    p.add_argument("dir", help="study folder")
    p.add_argument("--metric", choices=["top1", "best_top1"], default="top1",
                   help="top1: last epoch, as the study reports (default); best_top1: best epoch")
    p.add_argument("--html", action="store_true",
                   help="also write report.html: one self-contained page (tables, figures embedded, the claims' "
                        "intervals drawn) to open in a browser or send on")
    p.set_defaults(handler=cmd_report)


def _out(args, study) -> Path:
    return Path(args.out) if args.out else DEFAULT_ROOT / study.name


COUNTS = {"pack": (1, 1024), "workers": (1, 1024), "threads": (1, 1024)}  # the valid range of each count option


def _check_counts(args: argparse.Namespace) -> None:
    """--pack, --workers and --threads within their ranges, before anything is read or started."""
    for name, (low, high) in COUNTS.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise MixkdError(f"--{name} must be at least {low}, got {value}")
        if value is not None and value > high:
            raise MixkdError(f"--{name} must be at most {high}, got {value}")


def cmd_plan(args: argparse.Namespace) -> int:
    from mixkd.study.plan import format_plan
    from mixkd.study.report import claims_plan
    from mixkd.study.spec import load_study

    _check_counts(args)
    study = load_study(args.file, args.overrides, plugins=args.plugins)
    print(format_plan(study, _out(args, study), pack=args.pack))
    print("\n" + claims_plan(study))
    return 0


def summary_line(name: str, out: Path, counts: dict[str, int]) -> str:
    """The line a finished 'study run' prints: its counts, and where the errors are when there are any."""
    from mixkd.study.folder import STATE_NAME

    c = counts
    return (f"study {name}: {c['done']} finished, {c['failed']} failed, {c['blocked']} blocked"
            + (f" (errors in {out}/<run>/{ERROR_NAME} and {out}/{STATE_NAME})" if c["failed"] or c["blocked"] else ""))


def run_and_report(study, out: Path, executor: str = "local", workers: int | None = None, pack: int | None = None,
                   address: str | None = None, device: str | None = None, progress: bool = True,
                   report: bool = True, threads: int | None = None, time_limit: float | None = None) -> int:
    """Run ``study`` into ``out`` and write its report; returns the exit status (0: every run finished,
    75: stopped on time or by SIGTERM/SIGUSR1, 130: interrupted; both resumable). A write the storage
    refuses (a full disk, a quota, a read-only mount) stops the study: a StorageError (one line, exit
    status 2), every run resumable."""
    from mixkd.study.executors import make_executor
    from mixkd.study.folder import check_folder
    from mixkd.study.report import claims_text, write_report
    from mixkd.study.runner import run_study
    from mixkd.study.spec import check_device
    from mixkd.validate import format_problems, machine_problems

    if device:
        check_device(device)
    check_folder(out)  # a folder of another mixkd version: said first, before what this machine lacks
    problems = machine_problems([r.config_for(out, device).model_dump() for r in study.runs  # those still to train
                                 if not (out / r.id / RESULT_NAME).exists()])
    if problems:
        raise MixkdError(format_problems(problems))
    control = StopControl(time_limit)
    use_gpu = any((device or r.config.device) != "cpu" for r in study.runs)
    ex = make_executor(executor, workers, None, address, use_gpu, threads=threads, pack=pack,
                       time_limit=time_limit, deadline=control.inner_deadline(), lock_dir=str(out))
    control.install_signals()
    try:
        outcome = run_study(study, out, ex, device=device, progress=progress, control=control)
    finally:
        control.restore_signals()
    c = outcome.counts
    if outcome.interrupted and outcome.stopped is None:
        print(f"\ninterrupted: {c['done']} of {len(study.runs)} runs finished; the folder is resumable: "
              f"run the same command again", file=sys.stderr)
        return 130
    if outcome.stopped is not None:
        why = {"time": "stopped before the time limit", "signal": "stopped by a signal",
               "interrupt": "interrupted"}[outcome.stopped]
        print(f"{why}: {c['done']} of {len(study.runs)} runs finished, {c['stopped']} stopped with a checkpoint; "
              f"run the same command again to continue (mixkd study status {out})", file=sys.stderr)
        if report and outcome.stopped == "time":  # the time is up: no figures drawn after the limit
            print(f"write the report so far with: mixkd study report {out}")
        elif report:
            try:
                print(f"report (so far): {write_report(out)}")
            except MixkdError as e:  # nothing to report yet: the stop's exit status stands
                print(f"no report yet: {e}", file=sys.stderr)
        return control.exit_status
    print(summary_line(study.name, out, c))
    a = outcome.analyses
    if a:
        print(f"analyses: {a['done']} of {sum(a.values())} done, {a['failed']} failed"
              + (f" (errors in {out}/<run>/{ANALYSIS_ERROR_NAME}; run the study again to retry them)" if a["failed"] else ""))
    if report:
        print(f"report: {write_report(out)}")
        print(claims_text(out))
    return 0 if c["done"] == len(study.runs) and not outcome.analysis_failed else 1


def cmd_run(args: argparse.Namespace) -> int:
    from mixkd.study.spec import load_study

    _check_counts(args)
    limit = parse_duration(args.time_limit) if args.time_limit else None
    study = load_study(args.file, args.overrides + ([f"track.backend={args.track}"] if args.track else []),
                       plugins=args.plugins)
    return run_and_report(study, _out(args, study), args.executor, args.workers, args.pack, args.address,
                          args.device, progress=not args.no_progress and sys.stderr.isatty(), report=not args.no_report,
                          threads=args.threads, time_limit=limit)


def cmd_status(args: argparse.Namespace) -> int:
    from mixkd.study.status import format_status

    print(format_status(args.dir))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mixkd.study.report import write_html, write_report

    print(f"report: {write_report(args.dir, args.metric)} (and results.csv beside it)")
    if args.html:
        print(f"report: {write_html(args.dir)}")
    return 0
