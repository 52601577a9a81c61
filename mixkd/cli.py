"""The ``mixkd`` command line: train, distill, eval, analyze, models, demo.

Every run option is a key of :class:`mixkd.config.RunConfig`; flags, a ``--config`` YAML file and
trailing ``key=value`` overrides (e.g. ``mix.fraction=0.1``) all set those keys.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from mixkd.config import SEED_MAX, RunConfig, build_config, field_range, int_in, read_yaml, value_range
from mixkd.control import release_early_stops
from mixkd.errors import MixkdError, StorageError
from mixkd.files import AGAIN
from mixkd.registry import load_plugin
from mixkd.run_folder import ANALYSIS_NAME, CHECKPOINT_NAME, RunFolder, auto_resumes, resume_config, resume_mode


def _default(key: str) -> Any:
    """A config key's default, read from the fields (no validation: the KD methods, and torch with them,
    are imported only by the commands that need them)."""
    model: Any = RunConfig
    *sections, name = key.split(".")
    for part in sections:
        model = model.model_fields[part].annotation
    return model.model_fields[name].get_default(call_default_factory=True)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 150,180,210, got {text!r}") from None


# (option strings, config key, argparse keywords, help); the default shown comes from RunConfig.
RUN_OPTIONS: list[tuple[tuple[str, ...], str, dict[str, Any], str]] = [
    (("--dataset",), "dataset", {"choices": ["cifar100", "cifar10", "digits", "imagefolder"]}, "dataset"),
    (("--data-dir",), "data_dir", {}, "folder holding the dataset (cifar-100-python/, or train/ and val/ for imagefolder)"),
    (("--download",), "download", {"action": "store_const", "const": True}, "download CIFAR if it is missing (checks the official MD5)"),
    (("--image-size",), "image_size", {"type": int}, "crop size for imagefolder data (default 224)"),
    (("--epochs",), "epochs", {"type": int}, "training epochs"),
    (("--batch-size",), "batch_size", {"type": int}, "training batch size: the global batch, split over the processes of a torchrun/srun launch (each takes batch/N; --lr is for the global batch, scaling it is your choice)"),
    (("--eval-batch-size",), "eval_batch_size", {"type": int}, "evaluation batch size"),
    (("--lr",), "optim.lr", {"type": float}, "learning rate (default 0.05; 0.01 for MobileNetV2, ShuffleV1, ShuffleV2)"),
    (("--momentum",), "optim.momentum", {"type": float}, "SGD momentum"),
    (("--weight-decay",), "optim.weight_decay", {"type": float}, "weight decay"),
    (("--milestones",), "optim.milestones", {"type": _int_list}, "epochs where lr is multiplied by --lr-decay, e.g. 150,180,210 (default 62.5/75/87.5%% of --epochs)"),
    (("--lr-decay",), "optim.lr_decay", {"type": float}, "lr factor at each milestone"),
    (("--augment",), "augment", {}, "augmentation policies joined by '+': none, flip, flip_crop, cutout, autoaugment, randaugment, trivialaugment, random_erasing, then at most one of mixup, cutmix, cutmix_pick; see docs/augmentation.md"),
    (("--teacher-view",), "teacher_view", {"choices": ["same", "independent", "clean"]}, "what the teacher sees: same (the student's batch), independent (its own draw), clean (un-augmented)"),
    (("--mix",), "mix.method", {"choices": ["none", "mixup", "cutmix"]}, "mixing of the training batch"),
    (("--mix-alpha",), "mix.alpha", {"type": float}, "Beta(a, a) parameter of the mixing weight"),
    (("--mix-fraction",), "mix.fraction", {"type": float}, "share of each batch mixed: 1 = full mixup, 0.1 = the study's partial mixup"),
    (("--mix-sampling",), "mix.sampling", {"choices": ["exact", "reference"]}, "exact: round(f*B) samples; reference: the released code's with-replacement draw"),
    (("--seed",), "seed", {"type": int}, "random seed"),
    (("--device",), "device", {}, "auto, cpu, cuda or cuda:N"),
    (("--precision",), "precision", {"choices": ["auto", "fp32", "bf16"]}, "auto: bf16 on CUDA, fp32 on the CPU; bf16: forward passes under bf16 autocast with channels-last (losses in fp32)"),
    (("--sync-bn",), "sync_bn", {"action": "store_const", "const": True}, "under torchrun/srun: BatchNorm over the global batch (SyncBatchNorm), so N processes compute what one does"),
    (("--no-graph",), "graph", {"action": "store_const", "const": False}, "on CUDA, run the training step eagerly instead of replaying a CUDA graph"),
    (("--compile",), "compile", {"choices": ["auto", "on", "off"]}, "torch.compile the teacher and student inside the step (about 20 s of compilation per teacher-student pair, cached on disk); auto: on for CUDA runs except imagefolder, off on the CPU"),
    (("--out",), "out", {}, "run directory (default runs/<task>-<model>-<dataset>-<time>-<pid>)"),
    (("--save-every",), "save_every", {"type": int}, "checkpoint every N epochs (and at the end)"),
    (("--save-every-minutes",), "save_every_minutes", {"type": float}, "also checkpoint mid-epoch every M minutes (0: never)"),
    (("--workers",), "workers", {"type": int}, "data-loading processes for image folders (default: the cores available, at most 4)"),
    (("--threads",), "threads", {"type": int}, "CPU threads of torch (default: torch's own: OMP_NUM_THREADS, else the cores); on the CPU a run is bit-exact only with the same count, so resume with the one it started with (a resume with another count warns)"),
    (("--track",), "track.backend", {"choices": ["none", "mlflow", "wandb"]}, "also log the run to an experiment tracker: MLflow (track.uri: its tracking URI, default sqlite:///mlflow.db) or W&B (pip install 'mixkd[mlflow]' / 'mixkd[wandb]')"),
    (("--tensorboard",), "tensorboard", {"action": "store_const", "const": True}, "also log per-epoch scalars to <out>/tensorboard"),
    (("--no-progress",), "progress", {"action": "store_const", "const": False}, "no progress bar"),
]

DISTILL_OPTIONS: list[tuple[tuple[str, ...], str, dict[str, Any], str]] = [
    (("--teacher",), "kd.teacher", {}, "teacher checkpoint: a mixkd run directory / .safetensors, a RepDistiller .pth, a timm .safetensors/.pth or torchvision .pth, a Hugging Face hub cache folder or hf-hub:ORG/NAME (from the local cache, offline)"),
    (("--teacher-model",), "kd.teacher_model", {}, "teacher architecture (needed for a .pth: tv:resnet34 for torchvision's resnet34 weights, timm:resnet18 for timm's; a hub folder names its own)"),
    (("--kd",), "kd.method", {}, "the KD method (its settings are below, each defaulting to its authors'; "
                                 "--plugin FILE adds your own)"),
    (("--teacher-input",), "kd.teacher_input", {"choices": ["auto", "model", "dataset", "model_crop"]}, "the teacher's preprocessing: auto (its pretrained config's for a timm:/tv: teacher from a library weights file; its crop on evaluation views only), model, dataset, or model_crop (its crop on the training views too) (default: auto)"),
]
PLUGIN_HELP = ("a plugin: a .py file (or an importable module) registering KD methods of your own (see docs/methods.md); "
               "repeatable; its path and SHA-256 are recorded in the run")
_FLAG_ALIASES = {"temperature": ("-T",)}  # short forms of settings' flags


def _setting_type(annotation: Any):
    """An argparse ``type`` for a setting of this annotation: int, float, str; else a YAML scalar."""
    if annotation in (int, float, str):
        return annotation
    import yaml

    def parse(text: str) -> Any:
        return yaml.safe_load(text)

    parse.__name__ = getattr(annotation, "__name__", "value")
    return parse


def _add_method_options(p: argparse.ArgumentParser, dests: dict[str, str]) -> None:
    """One group per registered KD method (in registration order) listing its settings and their defaults;
    one flag per setting (``--beta`` sets ``kd.beta``), in the group of the first method that has it."""
    from mixkd.distiller import method_names
    from mixkd.registry import KD_METHODS

    seen: set[str] = set()
    for name in method_names():
        entry = KD_METHODS.get(name)
        fields = entry.settings.model_fields
        defaults = ", ".join(f"{k} {v}" for k, v in entry.defaults().items())
        where = "" if entry.source.startswith("mixkd.") else f" [plugin {entry.source}]"
        per_run = "; ".join(f"{key}: {', '.join(f'{k} {v}' for k, v in values.items())}"
                            for key, values in entry.context_defaults.items())
        text = entry.summary + (f" Defaults: {defaults}." if defaults else "") + (f" Except {per_run}." if per_run else "")
        group = p.add_argument_group(f"--kd {name}: {entry.title}{where}", text.replace("%", "%%"))
        for key, field in fields.items():
            if key in seen:
                continue
            seen.add(key)
            text = (field.description or key).replace("%", "%%")
            others = [m for m in method_names()[method_names().index(name) + 1:]
                      if key in KD_METHODS.get(m).settings.model_fields]
            if others:
                text += f"; also {', '.join(others)} (each its own default)"
            if field_range(field):
                text += f" (valid: {field_range(field)})"
            dest = f"opt_kd__{key}"
            group.add_argument(f"--{key.replace('_', '-')}", *_FLAG_ALIASES.get(key, ()), dest=dest, default=None,
                               type=_setting_type(field.annotation), metavar=key.upper(), help=text)
            dests[dest] = f"kd.{key}"


def preload_plugins(argv: list[str]) -> None:
    """Load the plugins a command line names (``--plugin``, and those of its ``--config`` file) before its
    parser is built, so that their methods' settings have flags and ``--help`` lists them."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--plugin", action="append", default=[])
    pre.add_argument("--config", "-c")
    known, _ = pre.parse_known_args(argv)
    if known.config and Path(known.config).is_file():
        listed = read_yaml(known.config).get("plugins") or []
        for spec in listed if isinstance(listed, list) else [listed]:
            if isinstance(spec, str):
                load_plugin(spec, Path(known.config).parent)
    for spec in known.plugin:
        load_plugin(spec)


def _add_run_options(p: argparse.ArgumentParser, options, dests: dict[str, str]) -> None:
    for names, key, kwargs, text in options:
        dest = "opt_" + key.replace(".", "__")
        default = None if key.startswith("kd.") else _default(key)
        shown = "" if default is None or kwargs.get("action") else f" (default: {default})"
        if kwargs.get("action") == "store_const" and kwargs.get("const") is False:
            shown = ""
        if value_range(key):
            shown += f" (valid: {value_range(key)})".replace("%", "%%")
        p.add_argument(*names, dest=dest, default=None, help=text + shown, **kwargs)
        dests[dest] = key


def _run_parser(sub, name: str, help_text: str, distill: bool, methods: bool = True) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text,
                       epilog="Any config key can also be set as key=value after the flags, e.g. mix.fraction=0.1 optim.lr=0.1.")
    p.add_argument("--config", "-c", help="YAML config file (flags and key=value override it); see configs/")
    model_names = ("--student", "--model") if distill else ("--model",)
    dests: dict[str, str] = {}
    p.add_argument(*model_names, dest="opt_model", default=None,
                   help=f"architecture to {'distill into' if distill else 'train'} (default: {_default('model')}; see 'mixkd models')")
    dests["opt_model"] = "model"
    p.add_argument("--plugin", dest="opt_plugins", action="append", default=None, metavar="FILE", help=PLUGIN_HELP)
    dests["opt_plugins"] = "plugins"
    if distill:
        _add_run_options(p, DISTILL_OPTIONS, dests)
    _add_run_options(p, RUN_OPTIONS, dests)
    if distill and methods:
        _add_method_options(p, dests)
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="auto",
                   help="continue the run in --out from its last checkpoint (only machine-local flags such as "
                        "--device, --data-dir, --workers, --no-progress may change); the folder must hold a run. "
                        "--resume auto (for a scheduler's requeue: one command rerun as it is; needs --out): "
                        "continue the run in --out if it has begun, else start it there; a folder holding another "
                        "run is refused. A torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) with --out counts as "
                        "--resume auto")
    p.add_argument("--time-limit", metavar="DURATION",
                   help="stop before DURATION (90s, 25m, 1:30:00) of wall time with a step-exact checkpoint and exit "
                        "with status 75 (resumable with --resume); SIGTERM/SIGUSR1 do the same")
    p.add_argument("--dist-backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="under torchrun/srun: the process group's backend; auto: nccl when each process has a GPU of "
                        "its own, gloo on the CPU or when processes share a GPU (default: auto)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(handler=_cmd_run, task=name, dests=dests, stops=True)
    return p


class Parser(argparse.ArgumentParser):
    """argparse's parser (every subcommand's too), with a bad command line said in one line
    (argparse prints its whole usage text first) and ``-`` then a digit read as a value, not as an
    option: ``--time-limit -5m`` is a negative duration (refused as one), not a missing value."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")  # argparse's: -5 and -.5, not -5m

    def error(self, message: str):
        raise MixkdError(f"{message} (see {self.prog} --help)")


def cudnn_text(version: int | None) -> str:
    """cuDNN's version number as torch gives it, written out: 92400 -> 9.24.0 (cuDNN 9: major * 10000 +
    minor * 100 + patch), 8902 -> 8.9.2 (cuDNN 8 and older: major * 1000 + minor * 100 + patch)."""
    if version is None:
        return "not available"
    major, rest = divmod(version, 10000 if version >= 10000 else 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def version_text() -> str:
    """What ``mixkd --version`` prints: mixkd's version, torch's and torchvision's, and the CUDA and cuDNN
    torch was built with and sees here (its GPUs)."""
    import torch
    import torchvision

    from mixkd import __version__

    cuda = torch.version.cuda
    if cuda is None:
        seen = "CUDA: none (a CPU build of torch)"
    else:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        seen = (f"CUDA {cuda} ({gpus} GPU(s) seen" + (f": {torch.cuda.get_device_name(0)}" if gpus else "") + "), "
                f"cuDNN {cudnn_text(cudnn)}")
    return (f"mixkd {__version__} (at {Path(__file__).resolve().parent})\n"
            f"torch {torch.__version__}, torchvision {torchvision.__version__}, {seen}")


class _VersionAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser. ``command``: the command about to run, when known; the KD methods'
    flags (which import the methods, and torch) are added to ``distill`` only when it is that one."""
    parser = Parser(
        prog="mixkd", description="Knowledge distillation with mixup: train teachers, distill students, evaluate.")
    parser.add_argument("--version", action=_VersionAction, nargs=0,
                        help="print mixkd's version, torch's, and the CUDA and cuDNN that torch sees, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _run_parser(sub, "train", "train a model (a teacher, or a student alone), optionally with mixup/CutMix", False)
    methods = command in (None, "distill")
    if methods:
        from mixkd.distiller import method_names
        from mixkd.registry import KD_METHODS

        labels = ", ".join(KD_METHODS.get(m).label for m in method_names())
        _run_parser(sub, "distill", f"distill a student from a teacher checkpoint ({labels})", True)
    else:
        _run_parser(sub, "distill", "distill a student from a teacher checkpoint (KD methods: see "
                                    "'mixkd distill --help')", True, methods=False)

    p = sub.add_parser("eval", help="test-set accuracy of a mixkd checkpoint or a RepDistiller .pth",
                       description="Test-set top-1, top-5 and NLL of a checkpoint (only the test split is loaded). "
                                   "Given a run directory, its dataset, data folder and image size are used unless "
                                   "flags say otherwise.")
    p.add_argument("checkpoint", help=f"a run directory, a {CHECKPOINT_NAME}, or a RepDistiller .pth")
    p.add_argument("--model", help="architecture (needed for a RepDistiller .pth)")
    p.add_argument("--dataset", choices=["cifar100", "cifar10", "digits", "imagefolder"], help="dataset (default: the run's, else cifar100)")
    p.add_argument("--data-dir", help="dataset folder (default: the run's, else ./data)")
    p.add_argument("--download", action="store_true", help="download CIFAR if missing")
    p.add_argument("--image-size", type=int_in(8, 4096, "--image-size"), help="crop size for imagefolder data (default: the run's, else 224)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int_in(1, 1_000_000, "--batch-size"), help="evaluation batch size (default: the run's, else 1024)")
    p.add_argument("--workers", type=int_in(0, 256, "--workers"), help="data-loading processes for image folders (default: the cores available, at most 4)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="evaluate in fp32 or under bf16 autocast (default: the run's precision, so that its figures are "
                        "reproduced: bf16 for a CUDA run; fp32 for a checkpoint without its run)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(handler=_cmd_eval)

    p = sub.add_parser("analyze", help="calibration, smoothness, fidelity, t-SNE and adversarial robustness of a checkpoint",
                       description="Analyze a checkpoint on the test set: top-1/top-5/NLL, ECE + reliability diagram, "
                                   "confidence, entropy, logit std, agreement and KL with a teacher, vicinal (mixed-pair) "
                                   f"metrics, t-SNE of features, FGSM/PGD robustness. Writes {ANALYSIS_NAME} and PNGs.")
    p.add_argument("checkpoint", help=f"a run directory, a {CHECKPOINT_NAME}, or a RepDistiller .pth")
    p.add_argument("--model", help="architecture (default: the run's; needed for a RepDistiller .pth)")
    p.add_argument("--teacher", help="teacher checkpoint for fidelity and teacher metrics (default: a distillation run's kd.teacher)")
    p.add_argument("--teacher-model", help="teacher architecture (needed for a RepDistiller .pth)")
    p.add_argument("--no-teacher", action="store_true", help="ignore the run's teacher")
    p.add_argument("--dataset", choices=["cifar100", "cifar10", "digits", "imagefolder"], help="dataset (default: the run's, else cifar100)")
    p.add_argument("--data-dir", help="dataset folder (default: the run's, else ./data)")
    p.add_argument("--download", action="store_true", help="download CIFAR if missing")
    p.add_argument("--image-size", type=int_in(8, 4096, "--image-size"), help="crop size for imagefolder data (default: the run's, else 224)")
    p.add_argument("--out", help="output folder (default: the run directory)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int_in(1, 1_000_000, "--batch-size"), default=1000, help="batch size of every pass, attacks included (default: 1000)")
    p.add_argument("--subset", type=int_in(1, 10_000_000, "--subset"), help="analyze N evenly spaced test images (the t-SNE set stays the same)")
    p.add_argument("--seed", type=int_in(0, 2**32 - 1, "--seed"), default=0, help="seed of the vicinal pairs, PGD starts and t-SNE (default: 0)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for all forward passes (faster on GPUs)")
    p.add_argument("--json", action="store_true", help=f"print {ANALYSIS_NAME} to stdout")
    p.set_defaults(handler=_cmd_analyze)

    p = sub.add_parser("augment-score", help="score augmentation policies before training: the teacher's T. stddev (Wang et al. 2022)",
                       description="Per policy, Wang et al.'s T. stddev: the standard deviation over N augmented "
                                   "training batches of the teacher's batch-mean class probability (at the KD "
                                   "temperature), averaged over classes, with a 95%% bootstrap interval over "
                                   "batches, and the teacher's mean entropy; lower predicts a better student. "
                                   "Runs the teacher only.")
    p.add_argument("--teacher", required=True, help=f"the teacher: a run directory, a {CHECKPOINT_NAME}, or a RepDistiller .pth")
    p.add_argument("--teacher-model", help="teacher architecture (needed for a RepDistiller .pth)")
    p.add_argument("--augment", help="comma-separated policy specs (default: none,flip_crop,cutout,autoaugment,"
                                     "mixup,cutmix,cutmix_pick)")
    p.add_argument("--batches", type=int_in(2, 1_000_000, "--batches"),
                   help="augmented batches per policy (default: 200: fewer widen the interval and make it miss more often)")
    p.add_argument("--batch-size", type=int_in(2, 65_536, "--batch-size"),
                   help="images per batch (default: 64, the recipe's: the statistic depends on it)")
    p.add_argument("--temperature", type=float, help="softmax temperature (default: a distillation run's kd.temperature, else 4)")
    p.add_argument("--dataset", choices=["cifar100", "cifar10", "digits"], help="dataset (default: the run's, else cifar100)")
    p.add_argument("--data-dir", help="dataset folder (default: the run's, else ./data)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--seed", type=int_in(0, 2**32 - 1, "--seed"), default=0, help="seed of the batches, the policies' draws and the bootstrap (default: 0)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.set_defaults(handler=_cmd_augment_score)

    p = sub.add_parser("models", help="list the available architectures",
                       description="List the model zoo (RepDistiller's CIFAR models and the tv_* ones), or with --source "
                                   "the architectures of timm or torchvision, named timm:NAME / tv:NAME (the library's "
                                   "own listing).")
    p.add_argument("--source", choices=["timm", "tv"], help="list timm's or torchvision's classifiers instead")
    p.add_argument("pattern", nargs="?", help="with --source: a wildcard (resnet*, *vit*) or a word the names contain")
    p.add_argument("--params", action="store_true", help="also count parameters (100 classes)")
    p.set_defaults(handler=_cmd_models)

    p = sub.add_parser("demo", help="a 2-minute demo on the embedded digits dataset (CPU, or the GPU when there is one)",
                       description="Run the quickstart study (configs/studies/quickstart.yaml) on scikit-learn's "
                                   "digits: a plain and a mixup teacher, students over the study's methods at "
                                   "T = 1 and 4, analyses; print the table and where the report (with figures) is.")
    p.add_argument("--out", default="runs/demo", help="study folder for the demo's runs (default: runs/demo)")
    p.add_argument("--epochs", type=int_in(1, 100_000, "--epochs"), default=None, help="epochs per run (default: the demo's own)")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--seed", type=int_in(0, SEED_MAX, "--seed"), default=0, help="random seed (default: 0)")
    p.set_defaults(handler=_cmd_demo, stops=True)

    p = sub.add_parser("claims", help="the study's five claims on a results table (CSV): verdicts with 95%% intervals",
                       description="Check the study's claims on a CSV with one row per trained student and the columns "
                                   "teacher, teacher_mix, student, kd, temperature, mix, mix_fraction, sampling, seed, "
                                   "top1 (see mixkd/results.py); print each claim's verdict, parts and intervals.")
    p.add_argument("table", help="results table (CSV)")
    p.add_argument("--json", metavar="FILE", help="also write the claims as JSON (claims.json's layout) to FILE")
    p.add_argument("--noise", type=float, metavar="SIGMA", help="per-run standard deviation of top-1 (points) assumed "
                                                                "where runs measure no spread: a single run, or runs "
                                                                "all equal (default: none, such comparisons are "
                                                                "inconclusive)")
    p.add_argument("--metric", choices=["top1", "best_top1"], default="top1",
                   help="top1: the last epoch's top-1, as the study (and the paper) report (default); best_top1: the "
                        "best epoch's, as mdistiller's published figures (the table's best_top1 column)")
    p.add_argument("--margin", type=float, default=0.5, metavar="DELTA",
                   help="points a non-inferiority ('at least as well') may fall short by (default: 0.5)")
    p.set_defaults(handler=_cmd_claims)

    from mixkd.study.cli import add_study_parser

    add_study_parser(sub)  # mixkd study plan | run | report
    return parser


def _given_keys(args: argparse.Namespace, flags: dict[str, Any]) -> list[str]:
    """Dotted config keys set explicitly by flags, the --config file or key=value overrides."""
    from mixkd.config import parse_override, read_yaml

    def flat(tree: dict[str, Any], prefix: str = "") -> list[str]:
        keys = []
        for k, v in tree.items():
            keys += flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
        return keys

    keys = [k for k, v in flags.items() if v is not None and k not in ("task", "out")]
    if args.config:
        keys += flat(read_yaml(args.config))
    keys += [parse_override(t)[0].replace("-", "_") for t in args.overrides or []]
    return list(dict.fromkeys(keys))


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's config (:func:`run_from_args`'s)."""
    return run_from_args(args)[0]


def run_from_args(args: argparse.Namespace) -> tuple[RunConfig, bool]:
    """(the run's config, whether it continues a run). mixkd.run_folder decides whether to resume
    (resume_mode, auto_resumes). Resuming: the saved config, where only machine-local keys
    (config.MACHINE_KEYS: device, data folder, progress, ...) may be changed; any other flag that differs from it
    is refused."""
    if args.resume not in (True, False, "auto"):
        if "=" not in args.resume:
            raise MixkdError(f"--resume takes no value, or 'auto' (got {args.resume!r})")
        args.overrides = [args.resume, *(args.overrides or [])]  # a key=value after a plain --resume
        args.resume = True
    flags = {key: getattr(args, dest) for dest, key in args.dests.items()}
    flags["task"] = args.task
    mode = resume_mode(args.resume, bool(flags.get("out")))
    if mode == "auto":
        cfg = build_config(args.config, flags, args.overrides)
        if not auto_resumes(cfg):
            return cfg, False
        return resume_config(cfg.out, task=args.task, machine=cfg), True
    if mode is None:
        return build_config(args.config, flags, args.overrides), False
    if not flags.get("out"):
        raise MixkdError("--resume needs --out: the run directory to continue")
    out = Path(flags["out"])
    folder = RunFolder(out)
    given = _given_keys(args, flags) if folder.config.is_file() else []
    asked: dict[str, Any] = {}
    if given:  # the values asked for, read as the saved run would read them (its teacher unless given)
        saved_teacher = folder.read_config().kd.teacher
        tree = build_config(args.config, {**flags, "kd.teacher": flags.get("kd.teacher") or saved_teacher}, args.overrides)
        asked = {k: _dotted(tree, k) for k in given}
    return resume_config(out, task=args.task, asked=asked), True


def _dotted(cfg: RunConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part, None)
    return node


def _cmd_run(args: argparse.Namespace) -> int:
    from mixkd import distributed

    try:
        return _run_command(args, distributed)
    finally:
        distributed.shutdown()


def _run_command(args: argparse.Namespace, distributed) -> int:
    from mixkd.control import STOP_WORDS, StopControl, parse_duration
    from mixkd.device import resolve_device
    from mixkd.engine import StoppedRun, run_job

    cfg, resume = run_from_args(args)
    control = StopControl(parse_duration(args.time_limit) if args.time_limit else None)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    distributed.setup(resolve_device(cfg.device), args.dist_backend)  # torchrun / srun: one run, many processes

    def echo(line: str) -> None:
        if distributed.is_main():
            print(line, file=sys.stderr, flush=True)

    control.install_signals(same_interrupt_within=5.0 if distributed.active() else 0.0)
    try:
        job = run_job(cfg, resume=resume, control=control, echo=echo)
    except StorageError as full:  # a full disk: advice that works, for the run as the failed write left it
        job = getattr(full, "job", None)
        if full.problem is None or job is None or not job.writes:
            raise
        kept = " (the last checkpoint is kept)" if job.folder.checkpoint.exists() else ""
        again = (f"continue with: mixkd {args.task} --out {shlex.quote(str(job.dir))} --resume"
                 if job.folder.has_begun() and not args.resume else AGAIN)
        raise StorageError(f"{full.problem}; free some space{kept} and {again}") from None
    except StoppedRun as stopped:
        job = stopped.run
        why = {"time": "stopped before the time limit", "signal": "stopped by a signal",
               "interrupt": "interrupted"}[stopped.reason]
        if not distributed.is_main():
            print(f"rank {distributed.rank()} of {distributed.world()}: {STOP_WORDS[stopped.reason]} at epoch "
                  f"{job.epoch + 1} step {job.step_in_epoch}", file=sys.stderr)
        elif not job.created:  # stopped before this process wrote anything: never claim a checkpoint
            what = "start it" if job.fresh else "continue it"
            print(f"{why} before the run {'began' if job.fresh else 'continued'}: nothing was written to {job.dir}; "
                  f"run the same command again to {what}", file=sys.stderr)
        else:
            again = " (or run the same command again)" if args.resume == "auto" else ""
            print(f"{why} at epoch {job.epoch + 1} step {job.step_in_epoch} of {job.steps_per_epoch} (checkpoint "
                  f"written); continue with: mixkd {args.task} --out {shlex.quote(str(job.dir))} --resume{again}",
                  file=sys.stderr)
        return control.exit_status
    finally:
        control.restore_signals()
    control.settle()  # finished: a stop that comes now (while the process leaves) changes nothing
    result = job.result
    if not distributed.is_main():
        return 0
    print(f"{args.task} {result['model']}: top-1 {result['top1']:.2f}% (last epoch), best {result['best_top1']:.2f}% "
          f"(epoch {result['best_epoch']}), top-5 {result['top5']:.2f}%; run in {job.dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mixkd.evaluation import evaluate_checkpoint

    m = evaluate_checkpoint(args.checkpoint, args.dataset, args.data_dir, model=args.model, device=args.device,
                            download=args.download, batch_size=args.batch_size, image_size=args.image_size,
                            workers=args.workers, precision=args.precision)
    if m.get("preprocessing") and not args.json:
        print(f"note: {m['preprocessing']}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(m))
    else:
        print(f"{m['model']} on {m['dataset']}: top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  NLL {m['nll']:.4f}  "
              f"({m['precision']}, {m['precision_from']})")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from mixkd.analysis import analyze_run

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    a = analyze_run(args.checkpoint, teacher=args.teacher, teacher_model=args.teacher_model, no_teacher=args.no_teacher,
                    model=args.model, dataset=args.dataset, data_dir=args.data_dir, download=args.download,
                    image_size=args.image_size, device=args.device, out=args.out, subset=args.subset,
                    batch_size=args.batch_size, seed=args.seed, amp=args.amp, log=None if args.json else log)
    if args.json:
        print(json.dumps(a))
        return 0
    s, rob = a["student"], a["robustness"]
    fid = f"  agreement {a['fidelity']['agreement']:.2f}%  KL {a['fidelity']['kl']:.4f}" if a["fidelity"] else ""
    print(f"{a['model']} on {a['dataset']} ({a['num_images']} images): top-1 {s['top1']:.2f}%  ECE {100 * s['ece']:.2f}%  "
          f"entropy {s['entropy']:.3f}{fid}  PGD {rob['eps_255'][-1]}/255 {rob['pgd'][-1]:.2f}%; "
          f"{ANALYSIS_NAME} and PNGs written to {a['out_dir']} in {a['seconds']:.1f} s")
    return 0


def _cmd_augment_score(args: argparse.Namespace) -> int:
    from mixkd.analysis import augment_score as score

    policies = score.parse_policies(args.augment or ",".join(score.DEFAULT_POLICIES))
    bar = None

    def progress(policy: str, done: int, total: int) -> None:
        nonlocal bar
        if args.json:
            return
        from tqdm.auto import tqdm

        if bar is None or bar.desc != policy:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, unit="batch", desc=policy, dynamic_ncols=True, leave=False, file=sys.stderr)
        bar.update(done - bar.n)

    try:
        scores = score.augment_score(args.teacher, policies, teacher_model=args.teacher_model, dataset=args.dataset,
                                     data_dir=args.data_dir, batches=args.batches or score.DEFAULT_BATCHES,
                                     batch_size=args.batch_size or score.DEFAULT_BATCH_SIZE,
                                     temperature=args.temperature, device=args.device, seed=args.seed,
                                     progress=progress)
    finally:
        if bar is not None:
            bar.close()
    saved = None
    if Path(args.teacher).is_dir():  # a run folder keeps its scores: a study's report reads them (claim 6)
        saved = score.save_scores(args.teacher, scores, args.batch_size or score.DEFAULT_BATCH_SIZE)
    if args.json:
        print(json.dumps([s.as_dict() for s in scores]))
    else:
        print(score.format_scores(scores) + (f"\nsaved in {saved}" if saved else ""))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from mixkd.models import available_models, create_model, default_lr, list_external

    if args.pattern and not args.source:
        raise MixkdError("a PATTERN needs --source timm or --source tv (the zoo's own list is short: 'mixkd models')")
    names = list_external(args.source, args.pattern) if args.source else available_models()
    if args.source and not names:
        raise MixkdError(f"no {args.source} model matches {args.pattern!r}; list them all with "
                         f"'mixkd models --source {args.source}'")
    width = max(14, *(len(n) for n in names))
    for name in names:
        if args.params:
            n = sum(p.numel() for p in create_model(name, 100).parameters())
            print(f"{name:{width}s} {n / 1e6:7.2f}M params  lr {default_lr(name)}")
        else:
            print(name)
    return 0


def _cmd_claims(args: argparse.Namespace) -> int:
    from mixkd.claims import check, claims_json, format_claims, schedule_note
    from mixkd.files import atomic_write_text
    from mixkd.results import read_csv

    results = read_csv(args.table)
    claims = check(results, noise=args.noise, margin=args.margin, metric=args.metric)
    print(format_claims(claims, metric=args.metric))
    print(schedule_note(results))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(claims_json(claims, args.noise, args.margin, args.metric),
                                                      indent=1, ensure_ascii=False) + "\n")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mixkd.demo import run_demo

    run_demo(args.out, epochs=args.epochs, device=args.device, seed=args.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        preload_plugins(sys.argv[1:] if argv is None else argv)  # before the parser: their settings' flags
        given = sys.argv[1:] if argv is None else argv
        args = build_parser(given[0] if given and not given[0].startswith("-") else "").parse_args(argv)  # a number out of its range is a MixkdError already here
        if not getattr(args, "stops", False):
            release_early_stops()  # a command without a graceful stop: SIGTERM and Ctrl-C act as usual
        status = args.handler(args)
    except MixkdError as e:
        print(f"mixkd: error: {e}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        status = 130
    from mixkd.control import EXIT_STOPPED

    # Leave at once, without the interpreter's teardown, (a) when stopped for a deadline: everything is
    # written, and the teardown (torch's, mostly) would count against a wall-time limit; (b) after a
    # process group (torchrun, srun): a peer that left first can make gloo's threads abort the teardown
    # ("terminate called without an active exception", exit -6 instead of this status).
    grouped = sys.modules.get("mixkd.distributed")  # imported by the run commands only (it imports torch)
    if argv is None and (status == EXIT_STOPPED or (grouped is not None and grouped.was_grouped())):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
