"""Studies: grids of teacher and student runs from one YAML file, run locally or on Ray, resumable,
reported as the study's table and figures.

    mixkd study plan   configs/studies/quickstart.yaml --out runs/quickstart   # runs, status, compute
    mixkd study run    configs/studies/quickstart.yaml --out runs/quickstart   # then the report
    mixkd study report runs/quickstart                                         # results.csv, report.md, claims.json

A study file (see ``configs/studies/``)::

    name: my-study
    defaults: {dataset: cifar100, epochs: 240}       # RunConfig keys for every run
    teachers:                                        # groups: models x mix settings x seeds
      - {name: plain, models: [resnet56, resnet110]}
      - {name: mixup, models: resnet56, mix: {method: mixup}, recipe: {epochs: 200}}
      - {name: rd, checkpoint: ckpt_epoch_240.pth, model: resnet32x4}   # an existing teacher
    students:                                        # groups: (models or pairs) x teachers x methods x ...
      - teachers: [plain, mixup]                     # teacher group names
        models: [resnet20, resnet32]                 # or pairs: ["resnet110 -> resnet20", ...]
        methods: [alone, kd, kd_fmu, kd_pmu, std, std_pmu]
        temperatures: [1, 4]                         # Hinton KD methods only
        fractions: [0.1]                             # partial mixup (*_pmu) only
        alphas: [1.0]                                # Beta(a, a) of mixup
        mix_modes: [mixup]                           # or cutmix
        seeds: [0, 1, 2]
        recipe: {optim: {lr: 0.05}}                  # RunConfig keys for this group
        analysis: false                              # (optional) not this group's runs
    analysis: {subset: 1000, tsne_pair: {teacher: mixup, student: resnet20}}  # mixkd analyze after each run
    claims: {noise: 0.4, margin: 0.5}                # the report's claims: sigma assumed where runs measure no spread

``mixkd study run --set KEY=VALUE`` sets a RunConfig key in every run (e.g. ``--set data_dir=/data``).

Each run is an engine run directory ``DIR/<run id>`` (``teachers/resnet56_mixup-s0``,
``students/resnet20-from-resnet56_mixup-kd_pmu-T4-f0.1-s0``, ...). Running again skips finished
runs, resumes interrupted ones and retries failed ones; a run directory made with other settings
than the file now says is reported, never silently reused. With ``--executor ray`` the study folder
must be on storage that every node of the cluster mounts at the same path, and mixkd must be
installed on every node (``pip install mixkd[ray]``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The names below load on first use (PEP 562): importing a light study module (the command line's parser,
# the claims' report helpers) must not import torch through the executors (``mixkd claims`` stays torch-free).
_WHERE = {"Executor": "executors", "InProcessExecutor": "executors", "LocalExecutor": "executors",
          "RayExecutor": "executors", "make_executor": "executors", "format_plan": "plan", "collect": "report",
          "write_report": "report", "StudyOutcome": "runner", "run_study": "runner", "METHODS": "spec",
          "PlannedRun": "spec", "Study": "spec", "load_study": "spec"}
__all__ = ["METHODS", "Executor", "InProcessExecutor", "LocalExecutor", "PlannedRun", "RayExecutor", "Study", "StudyOutcome",
           "collect", "format_plan", "load_study", "make_executor", "run_study", "write_report"]  # = _WHERE's names

if TYPE_CHECKING:
    from mixkd.study.executors import Executor, InProcessExecutor, LocalExecutor, RayExecutor, make_executor
    from mixkd.study.plan import format_plan
    from mixkd.study.report import collect, write_report
    from mixkd.study.runner import StudyOutcome, run_study
    from mixkd.study.spec import METHODS, PlannedRun, Study, load_study


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mixkd.study' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mixkd.study.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
