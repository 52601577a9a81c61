"""One analysis of a model (and optionally its teacher) on a test set, written to a folder:
``analysis.json`` (every metric), ``reliability.png``, ``logit_std.png``, ``tsne.png`` (+ ``tsne.npz``;
``tsne_teacher.*`` too with a teacher) and ``robustness.png``.

Entry points: :func:`analyze_run` (a run directory or checkpoint, defaults from the run's
``config.yaml``), :func:`analyze_models` (models already built). For reports over many runs:
:func:`load_analysis`, :func:`summary_row`, :func:`summarize`, :func:`robustness_curves`, and
:func:`mixkd.analysis.tsne.tsne_montage`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixkd.analysis import plots
from mixkd.analysis.attacks import EPSILONS_255, PGD_STEPS, robust_accuracy
from mixkd.analysis.inputs import (
    TSNE_CLASSES,
    TSNE_PER_CLASS,
    Normalized,
    load_images,
    split_labels,
    subset_indices,
    tsne_indices,
)
from mixkd.analysis.metrics import ECE_BINS, LAMBDAS, fidelity, output_metrics, penultimate_features, predict, vicinal
from mixkd.analysis.tsne import TEACHER_TSNE_FILE, TSNE_FILE, embed, save_embedding
from mixkd.checkpoint import load_checkpoint, load_weights
from mixkd.data import DataSpec, load_dataset
from mixkd.device import resolve_device
from mixkd.errors import MixkdError
from mixkd.files import atomic_write_text, check_writable, make_dir
from mixkd.loading import is_hub_source, load_teacher
from mixkd.models import available_models, create_model
from mixkd.models.external import split_name
from mixkd.models.preprocess import Preprocessing
from mixkd.run_folder import ANALYSIS_NAME as ANALYSIS_FILE
from mixkd.run_folder import CHECKPOINT_NAME, RunFolder, resolve_teacher
from mixkd.tracking import log_files

FORMAT = "mixkd-analysis-1"
PNG_FILES = {"reliability": "reliability.png", "logit_std": "logit_std.png", "tsne": "tsne.png",
             "robustness": "robustness.png"}
DEFAULT_BATCH_SIZE = 1000


@dataclass(frozen=True)
class AnalysisOptions:
    subset: int | None = None  # analyze every (N/subset)-th test image; None = all (t-SNE set unaffected)
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0  # vicinal pairs, PGD random starts, t-SNE
    amp: bool = False  # bf16 autocast for every forward pass (CUDA)
    epsilons_255: tuple[float, ...] = EPSILONS_255
    pgd_steps: int = PGD_STEPS
    lambdas: tuple[float, ...] = LAMBDAS
    ece_bins: int = ECE_BINS
    tsne_classes: int = TSNE_CLASSES
    tsne_per_class: int = TSNE_PER_CLASS
    workers: int | None = None  # image folders only; None: what the machine has (at most 4)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise MixkdError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.subset is not None and self.subset < 1:
            raise MixkdError(f"--subset must be at least 1, got {self.subset}")


class _Clock:
    """Wall time per stage (synchronizing CUDA at stage boundaries only)."""

    def __init__(self, device: torch.device, log: Callable[[str], None] | None):
        self.device, self.log, self.times = device, log, {}
        self.start = self.last = time.perf_counter()

    def stage(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[name] = now - self.last
        self.last = now
        if self.log:
            self.log(f"  {name}: {self.times[name]:.1f} s")

    def total(self) -> float:
        return time.perf_counter() - self.start


def analyze_models(student: nn.Module, spec: DataSpec, out_dir: str | Path, *, teacher: nn.Module | None = None,
                   device: torch.device | str = "cpu", options: AnalysisOptions | None = None,
                   student_label: str = "student", teacher_label: str = "teacher",
                   info: Mapping[str, Any] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Analyze ``student`` (and ``teacher``) on ``spec``'s test split; write ``analysis.json`` and the
    PNGs into ``out_dir``; return the analysis. The models take normalized input, as trained."""
    opt = options or AnalysisOptions()
    device = torch.device(device)
    out = Path(out_dir)
    check_writable(out)  # before the analysis, not after it
    clock = _Clock(device, log)
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    try:
        return _analyze(student, spec, out, teacher, device, opt, student_label, teacher_label, info or {}, clock)
    finally:
        torch.backends.cudnn.benchmark = benchmark


def _analyze(student, spec, out, teacher, device, opt, student_label, teacher_label, info, clock) -> dict:
    labels_all = split_labels(spec)
    data = load_images(spec, subset_indices(len(labels_all), opt.subset), device, opt.workers)
    tsne_idx = tsne_indices(labels_all, min(opt.tsne_classes, spec.num_classes), opt.tsne_per_class)
    tsne_data = load_images(spec, tsne_idx, device, opt.workers)
    models = {"student": Normalized(student, spec.mean, spec.std).to(device).eval()}
    if teacher is not None:
        models["teacher"] = Normalized(teacher, spec.mean, spec.std).to(device).eval()
    names = {"student": student_label, "teacher": teacher_label}
    clock.stage("load")

    logits = {k: predict(m, data, opt.batch_size, device, opt.amp) for k, m in models.items()}
    result: dict[str, Any] = {k: output_metrics(v, data.labels, opt.ece_bins) for k, v in logits.items()}
    result.setdefault("teacher", None)
    result["fidelity"] = fidelity(logits["student"], logits["teacher"]) if teacher is not None else None
    clock.stage("clean")

    probs = {k: v.softmax(dim=1) for k, v in logits.items()}
    vic = vicinal(models, probs, data, opt.batch_size, device, opt.lambdas, opt.seed, opt.amp)
    if result["fidelity"] is not None:
        result["fidelity"]["vicinal"] = vic.pop("fidelity")
    else:
        vic.pop("fidelity")
    vic.setdefault("teacher", None)
    result["vicinal"] = vic
    clock.stage("vicinal")

    roles_tsne = [("student", TSNE_FILE), ("teacher", TEACHER_TSNE_FILE)][:len(models)]
    embeddings = {role: embed(penultimate_features(models[role], tsne_data, opt.batch_size, device, opt.amp), opt.seed)
                  for role, _ in roles_tsne}
    clock.stage("tsne")

    eps = [e / 255 for e in opt.epsilons_255]
    attacked = robust_accuracy(models["student"], data, opt.batch_size, device, eps, opt.pgd_steps, opt.seed, opt.amp)
    clock.stage("attacks")
    clean = result["student"]["top1"]
    result["robustness"] = {
        "eps_255": [0, *opt.epsilons_255], "fgsm": [clean, *attacked["fgsm"]], "pgd": [clean, *attacked["pgd"]],
        "norm": "linf", "space": "pixels in [0, 1], clipped", "pgd_steps": opt.pgd_steps, "pgd_step_size": "eps/4",
        "pgd_random_start": True, "pgd_counts": "a sample is robust only if correct at every PGD iterate"}
    tsne_labels = tsne_data.labels.cpu()
    for role, file in roles_tsne:
        save_embedding(out / file, embeddings[role], tsne_labels, tsne_idx, spec.class_names, names[role])
        panel = {"embedding": embeddings[role], "labels": tsne_labels.numpy(), "class_names": spec.class_names}
        plots.tsne_scatter(panel, out / file.replace(".npz", ".png"), title=f"t-SNE: {names[role]}")
    result["tsne"] = {"classes": list(range(min(opt.tsne_classes, spec.num_classes))), "per_class": opt.tsne_per_class,
                      "num_points": len(tsne_data), "seed": opt.seed, "file": TSNE_FILE,
                      "teacher_file": TEACHER_TSNE_FILE if teacher is not None else None}

    roles = {names[k]: result[k] for k in models}
    plots.reliability_diagram(roles, out / PNG_FILES["reliability"])
    plots.logit_std_histogram({n: m["logit_std"] for n, m in roles.items()}, out / PNG_FILES["logit_std"])
    plots.robustness_curves({student_label: result["robustness"]}, out / PNG_FILES["robustness"])
    clock.stage("plots")

    header = {"format": FORMAT, "out_dir": str(out), "label": student_label,
              "teacher_label": teacher_label if teacher is not None else None, "dataset": spec.name, "num_classes": spec.num_classes, "num_test_images": len(labels_all),
              "num_images": len(data), "device": str(device), "options": _jsonable(asdict(opt)), **info}
    result = {**header, **result, "plots": dict(PNG_FILES), "timing": clock.times, "seconds": clock.total()}
    atomic_write_text(out / ANALYSIS_FILE, json.dumps(result, indent=2) + "\n")
    return result


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# ---- from a run directory or checkpoint ---------------------------------------------------------

def _run_dir_of(path: Path) -> Path | None:
    if path.is_dir():
        return path
    if path.name == CHECKPOINT_NAME and RunFolder(path.parent).config.is_file():
        return path.parent
    return None


def _teacher_path(teacher: str, source: str) -> str:
    if Path(teacher).exists() or is_hub_source(teacher):
        return teacher
    if teacher in available_models() or split_name(teacher):
        raise MixkdError(f"teacher {teacher!r} ({source}) is an architecture name, not a checkpoint: pass a run "
                         "directory, .safetensors or .pth as --teacher (and the architecture as --teacher-model)")
    raise MixkdError(f"teacher checkpoint not found: {teacher} ({source}); pass --teacher PATH or --no-teacher")


def analyze_run(path: str | Path, *, teacher: str | None = None, teacher_model: str | None = None,
                no_teacher: bool = False, model: str | None = None, dataset: str | None = None,
                data_dir: str | None = None, download: bool = False, image_size: int | None = None,
                device: str = "auto", out: str | Path | None = None, subset: int | None = None,
                batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, amp: bool = False, label: str | None = None,
                log: Callable[[str], None] | None = None) -> dict:
    """Analyze a run directory, a ``.safetensors`` checkpoint or a RepDistiller ``.pth``.

    Unset arguments come from the run's ``config.yaml`` when there is one (else from the checkpoint;
    ``dataset`` finally defaults to cifar100, as for RepDistiller checkpoints): ``model``, ``dataset``,
    ``data_dir``, ``image_size`` and, for a distillation run, ``teacher`` / ``teacher_model``
    (``kd.teacher``, ``kd.teacher_model``); ``no_teacher`` skips the teacher. Output goes to ``out``,
    default the run directory (``<parent>/<stem>-analysis`` for a checkpoint file outside a run).
    Everything is loaded and checked before any computing starts. Returns the analysis.
    """
    p = Path(path)
    run_dir = _run_dir_of(p)
    folder = RunFolder(run_dir) if run_dir else None
    cfg = folder.read_config() if folder and folder.config.is_file() else None
    options = AnalysisOptions(subset=subset, batch_size=batch_size, seed=seed, amp=amp)
    ckpt = load_checkpoint(p)
    arch = model or ckpt.model_name or (cfg.model if cfg else None)
    if not arch:
        raise MixkdError(f"{p} does not say its architecture; pass --model (see 'mixkd models')")
    dataset = dataset or (cfg.dataset if cfg else None) or ckpt.meta.get("dataset") or "cifar100"
    if cfg is not None:
        data_dir = data_dir or cfg.data_dir
        image_size = image_size or cfg.image_size
    source = "--teacher"
    if not no_teacher and teacher is None and cfg is not None and cfg.task == "distill":
        teacher, teacher_model = resolve_teacher(cfg.kd.teacher, run_dir), teacher_model or cfg.kd.teacher_model
        source = f"kd.teacher in {folder.config}"
    if no_teacher:
        teacher = None
    if teacher is None and teacher_model is not None and not no_teacher:
        raise MixkdError("--teacher-model needs --teacher (the teacher's checkpoint)")
    if teacher is not None:
        teacher = _teacher_path(str(teacher), source)
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise MixkdError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    dev = resolve_device(device)
    spec = load_dataset(dataset, data_dir, download=download, image_size=image_size)
    trained_for = ckpt.meta.get("num_classes")
    if isinstance(trained_for, int) and trained_for != spec.num_classes:
        raise MixkdError(f"{p} was trained for {trained_for} classes but {dataset} has {spec.num_classes}; "
                         "analyze it on the dataset it was trained on (--dataset)")
    student = create_model(arch, spec.num_classes, spec.image_size)
    load_weights(student, ckpt.state_dict, str(p))
    teacher_net, teacher_arch = (None, None)
    if teacher is not None:
        teacher_net, teacher_arch = load_teacher(teacher, teacher_model, spec.num_classes, dev,
                                                 data=Preprocessing(spec.image_size, spec.mean, spec.std, crop_pct=spec.crop_pct),
                                                 teacher_input=cfg.kd.teacher_input if cfg else "auto", view="test")
    target = Path(out) if out is not None else run_dir or make_dir(p.parent / f"{p.stem}-analysis")  # mixkd's name: never a link
    info = {"checkpoint": str(p), "run_dir": str(run_dir) if run_dir else None, "model": arch,
            "teacher_checkpoint": teacher, "teacher_model": teacher_arch,
            "task": cfg.task if cfg else None}
    student_label = label or (f"{arch} ({run_dir.name})" if run_dir else arch)
    result = analyze_models(student, spec, target, teacher=teacher_net, device=dev, options=options,
                            student_label=student_label, teacher_label=f"teacher {teacher_arch}",
                            info=info, log=log)
    if run_dir is not None and target == run_dir:  # a tracked run (--track): its analysis as artifacts
        log_files(run_dir, [target / ANALYSIS_FILE, *sorted(target.glob("*.png"))], warn=log)
    return result


# ---- reading analyses back (for reports over many runs) ----------------------------------------

def load_analysis(path: str | Path) -> dict:
    """``analysis.json`` of a run/analysis directory, or that file itself."""
    p = Path(path)
    if p.is_dir():
        p = p / ANALYSIS_FILE
    if not p.is_file():
        raise MixkdError(f"no analysis at {p}; run 'mixkd analyze' on it first")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise MixkdError(f"{p} is not valid JSON ({e.msg} at line {e.lineno}); rerun 'mixkd analyze'") from None


def _as_analysis(item: Mapping | str | Path) -> Mapping:
    return item if isinstance(item, Mapping) else load_analysis(item)


def _key(x: float) -> str:
    return f"{x:g}"


def summary_row(analysis: Mapping | str | Path) -> dict[str, float | None]:
    """One flat row of an analysis (None where it has no teacher): top1, top5, nll, ece (fraction),
    confidence, entropy, logit_std (mean), agreement (%), kl, vicinal_{acc,entropy,gap}_<lambda>,
    fgsm_<eps x 255> and pgd_<eps x 255> (accuracy %, e.g. pgd_8)."""
    a = _as_analysis(analysis)
    s = a["student"]
    row: dict[str, float | None] = {k: s[k] for k in ("top1", "top5", "nll", "ece", "confidence", "entropy")}
    row["logit_std"] = s["logit_std"]["mean"]
    fid = a.get("fidelity")
    row["agreement"] = fid["agreement"] if fid else None
    row["kl"] = fid["kl"] if fid else None
    for lam in a["vicinal"]["lambdas"]:
        v = a["vicinal"]["student"][str(lam)]
        row[f"vicinal_acc_{_key(lam)}"] = v["accuracy"]
        row[f"vicinal_entropy_{_key(lam)}"] = v["entropy"]
        row[f"vicinal_gap_{_key(lam)}"] = v["linearity_gap"]
    rob = a["robustness"]
    for attack in ("fgsm", "pgd"):
        for eps, acc in zip(rob["eps_255"], rob[attack]):
            if eps:
                row[f"{attack}_{_key(eps)}"] = acc
    return row


# Columns of the paper-style table: (summary_row key, header, multiplier for display).
TABLE_COLUMNS: list[tuple[str, str, float]] = [
    ("top1", "top-1 (%)", 1.0), ("ece", "ECE (%)", 100.0), ("entropy", "entropy", 1.0),
    ("agreement", "agreement (%)", 1.0), ("kl", "KL(T||S)", 1.0), ("fgsm_8", "FGSM 8/255 (%)", 1.0),
    ("pgd_2", "PGD 2/255 (%)", 1.0), ("pgd_8", "PGD 8/255 (%)", 1.0),
]


def summarize(analyses: Sequence[Mapping | str | Path]) -> dict[str, Any]:
    """Mean and (sample) std over runs (e.g. the seeds of one method) of every :func:`summary_row`
    key, ignoring runs where a value is None: {"n": runs, "mean": {...}, "std": {...}}."""
    rows = [summary_row(a) for a in analyses]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    mean, std = {}, {}
    for k in keys:
        vals = torch.tensor([r[k] for r in rows if r.get(k) is not None], dtype=torch.float64)
        mean[k] = float(vals.mean()) if len(vals) else None
        std[k] = float(vals.std()) if len(vals) > 1 else (0.0 if len(vals) else None)
    return {"n": len(rows), "mean": mean, "std": std}


def robustness_curves(methods: Mapping[str, Mapping | str | Path | Sequence[Mapping | str | Path]],
                      out_png: str | Path) -> Path:
    """One PNG with accuracy-under-attack curves (FGSM and PGD panels), one line per method.
    ``methods``: label -> an analysis (dict, analysis.json or its directory) or a list of them
    (e.g. the seeds of a method; their curves are averaged; their epsilons must agree)."""
    curves = {}
    for label, items in methods.items():
        group = [items] if isinstance(items, (Mapping, str, Path)) else list(items)
        robs = [_as_analysis(i)["robustness"] for i in group]
        eps = robs[0]["eps_255"]
        if any(r["eps_255"] != eps for r in robs):
            raise MixkdError(f"robustness_curves: the analyses of {label!r} used different epsilons")
        curves[label] = {"eps_255": eps, **{a: [sum(r[a][k] for r in robs) / len(robs) for k in range(len(eps))]
                                           for a in ("fgsm", "pgd")}}
    return plots.robustness_curves(curves, out_png)
