"""``mixkd study plan | run | report``: the command-line side of studies."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_ROOT = Path("runs")


def add_study_parser(sub) -> None:
    study = sub.add_parser("study", help="grids of runs from one study file: plan, run, report",
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
    p.add_argument("--set", **over)
    p.set_defaults(handler=cmd_plan)

    p = commands.add_parser("run", help="run every unfinished run of a study (teachers first), then report",
                            description="Run a study into a folder of run directories. Idempotent: finished runs are "
                                        "skipped, interrupted ones resumed, failed ones retried. Ctrl-C stops cleanly.")
    p.add_argument("file", help="study file (YAML)")
    p.add_argument("--out", help="study folder (default: runs/<study name>); with Ray, on storage every node shares")
    p.add_argument("--executor", choices=["local", "ray"], default="local", help="local worker processes (default) or Ray tasks")
    p.add_argument("--workers", type=int, help="parallel runs (local default: GPUs x --runs-per-gpu, or min(cores, 4) on CPU; "
                                               "Ray default: as many as the cluster takes)")
    p.add_argument("--runs-per-gpu", type=int, default=1, help="runs sharing one GPU (default: 1)")
    p.add_argument("--address", help="Ray cluster address (default: start Ray on this machine)")
    p.add_argument("--device", help="device for every run, overriding the study file: auto, cpu, cuda")
    p.add_argument("--no-progress", action="store_true", help="print one line per finished run instead of a progress bar (the default when stderr is not a terminal)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--set", **over)
    p.set_defaults(handler=cmd_run)

    p = commands.add_parser("report", help="write results.csv and report.md (table and figures) for a study folder",
                            description="Write results.csv (one row per run) and report.md with PNG figures.")
    p.add_argument("dir", help="study folder")
    p.add_argument("--metric", choices=["top1", "best_top1"], default="top1",
                   help="top1: last epoch, as the study reports (default); best_top1: best epoch")
    p.set_defaults(handler=cmd_report)


def _out(args, study) -> Path:
    return Path(args.out) if args.out else DEFAULT_ROOT / study.name


def cmd_plan(args: argparse.Namespace) -> int:
    from mixkd.study import format_plan, load_study

    study = load_study(args.file, args.overrides)
    print(format_plan(study, _out(args, study)))
    return 0


def run_and_report(study, out: Path, executor: str = "local", workers: int | None = None, runs_per_gpu: int = 1,
                   address: str | None = None, device: str | None = None, progress: bool = True,
                   report: bool = True) -> int:
    """Run ``study`` into ``out`` and write its report; returns the exit status (0: every run finished)."""
    from mixkd.study import make_executor, run_study, write_report

    use_gpu = any((device or r.config.get("device", "auto")) != "cpu" for r in study.runs)
    ex = make_executor(executor, workers, runs_per_gpu, address, use_gpu)
    outcome = run_study(study, out, ex, device=device, progress=progress)
    c = outcome.counts
    if outcome.interrupted:
        print(f"\ninterrupted: {c['done']} of {len(study.runs)} runs finished; the folder is resumable: "
              f"run the same command again", file=sys.stderr)
        return 130
    print(f"study {study.name}: {c['done']} finished, {c['failed']} failed, {c['blocked']} blocked "
          f"(errors in {out}/<run>/error.txt and {out}/study-state.json)")
    a = outcome.analyses
    if a:
        print(f"analyses: {a['done']} of {sum(a.values())} done, {a['failed']} failed"
              + (f" (errors in {out}/<run>/analysis-error.txt; run the study again to retry them)" if a["failed"] else ""))
    if report:
        print(f"report: {write_report(out)}")
    return 0 if c["done"] == len(study.runs) and not outcome.analysis_failed else 1


def cmd_run(args: argparse.Namespace) -> int:
    from mixkd.study import load_study

    study = load_study(args.file, args.overrides)
    return run_and_report(study, _out(args, study), args.executor, args.workers, args.runs_per_gpu, args.address,
                          args.device, progress=not args.no_progress and sys.stderr.isatty(), report=not args.no_report)


def cmd_report(args: argparse.Namespace) -> int:
    from mixkd.study import write_report

    print(f"report: {write_report(args.dir, args.metric)} (and results.csv beside it)")
    return 0
