"""Training and distillation: one resumable run, written to a run directory.

A run directory holds ``config.yaml`` (fully resolved), ``metrics.jsonl`` (one line per epoch),
``checkpoint.safetensors`` (weights, optimizer, RNG, epoch; written atomically every ``save_every``
epochs and at the end) and, once finished, ``result.json``.

Every epoch's data order, augmentation and mixing are drawn from generators re-seeded from
(seed, epoch), so a run resumed from a checkpoint computes exactly what an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import platform
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from mixkd import __version__
from mixkd.checkpoint import CHECKPOINT_NAME, atomic_write_text, load_checkpoint, load_weights, save_checkpoint
from mixkd.config import RunConfig, load_run_config
from mixkd.data import load_dataset, make_loaders
from mixkd.errors import MixkdError, TrainingDiverged
from mixkd.losses import KDObjective, supervised_objective
from mixkd.metrics import evaluate
from mixkd.mix import MixSpec
from mixkd.models import create_model, default_lr
from mixkd.step import SGD, GraphedTrainStep, TrainStep

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
RESULT_NAME = "result.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MixkdError(f"device '{name}' asked for, but CUDA is not available here; use --device cpu")
    return torch.device(name)


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A distinct, reproducible seed for each (run seed, epoch, random stream)."""
    return (seed * 1_000_003 + epoch * 7919 + stream * 104_729) % (2**63 - 1)


def load_model(checkpoint: str, arch: str | None, num_classes: int, flag: str = "--model") -> tuple[torch.nn.Module, str]:
    """A model with the weights of a mixkd checkpoint/run directory or a RepDistiller ``.pth``.

    ``arch`` may be omitted when the checkpoint names its architecture (mixkd checkpoints do).
    """
    ckpt = load_checkpoint(checkpoint)
    arch = arch or ckpt.model_name
    if not arch:
        raise MixkdError(f"{checkpoint} does not say its architecture; pass {flag} (see 'mixkd models')")
    model = create_model(arch, num_classes)
    load_weights(model, ckpt.state_dict, str(checkpoint))
    return model, arch


def load_teacher(checkpoint: str, arch: str | None, num_classes: int, device,
                 channels_last: bool = False) -> tuple[torch.nn.Module, str]:
    """A frozen teacher in eval mode (see :func:`load_model`)."""
    teacher, arch = load_model(checkpoint, arch, num_classes, flag="--teacher-model")
    teacher.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, arch


class Learner:
    """Owns the student (and frozen teacher) and turns a mixed batch into named losses.

    The teacher sees the same mixed batch as the student, forward only, in eval mode.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module | None = None,
                 objective: KDObjective | None = None):
        if (teacher is None) != (objective is None):
            raise ValueError("a teacher needs a KD objective and vice versa")
        self.student, self.teacher, self.objective = student, teacher, objective
        self.channels_last = False

    def losses(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        student_logits = self.student(x)
        if self.teacher is None:
            return supervised_objective(student_logits, target)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return self.objective(student_logits, teacher_logits, target)


def library_versions() -> dict[str, str]:
    import torchvision

    return {"mixkd": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.task}-{cfg.model}-{cfg.dataset}-{stamp}"


def prepare_run_dir(cfg: RunConfig, resume: bool) -> tuple[RunConfig, Path]:
    """Create the run directory, or reopen it with ``resume``; the saved config wins on resume."""
    out = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    saved = out / CONFIG_NAME
    if saved.exists():
        if not resume:
            raise MixkdError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
        saved_cfg = load_run_config(saved)
        return saved_cfg.model_copy(update={"out": str(out), "device": cfg.device, "progress": cfg.progress}), out
    if resume and out.exists() and any(out.iterdir()):
        raise MixkdError(f"cannot resume {out}: it has no {CONFIG_NAME}; is it a mixkd run directory?")
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"out": str(out)})
    atomic_write_text(saved, cfg.to_yaml())
    return cfg, out


class Run:
    """One training (``task='train'``) or distillation (``task='distill'``) run."""

    def __init__(self, cfg: RunConfig, resume: bool = False):
        self.cfg, self.dir = prepare_run_dir(cfg, resume)
        self.device = resolve_device(self.cfg.device)

    # ---- building --------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.cfg
        self.data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, image_size=cfg.image_size)
        self.train_loader, self.test_loader = make_loaders(
            self.data, cfg.batch_size, self.device, eval_batch_size=cfg.eval_batch_size, workers=cfg.workers)
        torch.manual_seed(cfg.seed)
        channels_last = cfg.precision == "bf16"
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = create_model(cfg.model, self.data.num_classes).to(self.device, memory_format=memory_format)
        self.teacher, self.teacher_arch, objective = None, None, None
        if cfg.task == "distill":
            self.teacher, self.teacher_arch = load_teacher(cfg.kd.teacher, cfg.kd.teacher_model,
                                                           self.data.num_classes, self.device, channels_last)
            objective = KDObjective(cfg.kd.method, cfg.kd.temperature, cfg.kd.ce_weight, cfg.kd.kd_weight)
        self.learner = Learner(self.model, self.teacher, objective)
        self.learner.channels_last = channels_last
        self.base_lr = cfg.optim.lr or default_lr(cfg.model)
        self.optimizer = SGD(self.model.parameters(), lr=self.base_lr, momentum=cfg.optim.momentum,
                             weight_decay=cfg.optim.weight_decay)
        self.mix = MixSpec(cfg.mix.method, cfg.mix.alpha, cfg.mix.fraction, cfg.mix.sampling)
        self.mix_generator = torch.Generator(device=self.device)
        step_cls = GraphedTrainStep if self.uses_graph else TrainStep
        self.step = step_cls(self.learner, self.optimizer, self.mix, self.data.num_classes, self.mix_generator,
                             cfg.precision)

    @property
    def uses_graph(self) -> bool:
        """CUDA graphs need CUDA and fixed-size batches from the device-resident loader."""
        from mixkd.data import DeviceLoader

        return self.cfg.graph and self.device.type == "cuda" and isinstance(self.train_loader, DeviceLoader)

    def lr_at(self, epoch: int) -> float:
        passed = sum(1 for m in self.cfg.milestones() if epoch >= m)
        return self.base_lr * self.cfg.optim.lr_decay ** passed

    # ---- state -----------------------------------------------------------------------------
    def _save(self, epoch: int) -> None:
        save_checkpoint(self.dir / CHECKPOINT_NAME, self.model, model_name=self.cfg.model,
                        num_classes=self.data.num_classes, epoch=epoch, optimizer=self.optimizer,
                        rng={"torch_cpu": torch.get_rng_state()},
                        extra={"dataset": self.cfg.dataset, "task": self.cfg.task})

    def _restore(self) -> tuple[int, list[dict[str, Any]]]:
        """Load the last checkpoint, if any; returns (first epoch to run, metrics of earlier epochs)."""
        path = self.dir / CHECKPOINT_NAME
        if not path.exists():
            (self.dir / METRICS_NAME).unlink(missing_ok=True)
            return 0, []
        ckpt = load_checkpoint(path)
        load_weights(self.model, ckpt.state_dict, str(path))
        if ckpt.optimizer_state is not None:
            self.optimizer.load_state_dict(ckpt.optimizer_state)
        if "torch_cpu" in ckpt.rng:
            torch.set_rng_state(ckpt.rng["torch_cpu"])
        history = [row for row in self._read_metrics() if row["epoch"] <= ckpt.epoch]
        self._write_metrics(history)  # epochs logged after the checkpoint are run again
        return ckpt.epoch, history

    def _read_metrics(self) -> list[dict[str, Any]]:
        path = self.dir / METRICS_NAME
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash
        return rows

    def _write_metrics(self, rows: list[dict[str, Any]]) -> None:
        atomic_write_text(self.dir / METRICS_NAME, "".join(json.dumps(r) + "\n" for r in rows))

    # ---- training --------------------------------------------------------------------------
    def train_epoch(self, epoch: int, progress=None) -> dict[str, float]:
        self.model.train()
        lr = self.lr_at(epoch)
        self.optimizer.set_lr(lr)
        self.train_loader.set_epoch_seed(epoch_seed(self.cfg.seed, epoch, 0))
        self.mix_generator.manual_seed(epoch_seed(self.cfg.seed, epoch, 1))
        for x, y in self.train_loader:
            self.step(x, y)
            if progress is not None:
                progress.update(1)
        means = self.step.epoch_means()
        means["lr"] = lr
        return means

    def execute(self) -> dict[str, Any]:
        """Run (or finish) the run; returns the contents of ``result.json``."""
        result_path = self.dir / RESULT_NAME
        if result_path.exists():
            return json.loads(result_path.read_text())
        self._build()
        start, history = self._restore()
        cfg = self.cfg
        precision = cfg.precision
        teacher_metrics = evaluate(self.teacher, self.test_loader, precision) if self.teacher is not None else None
        writer = self._tensorboard()
        progress = self._progress_bar(start)
        wall_start = time.perf_counter()
        train_seconds, train_images = 0.0, 0
        last_saved = start
        try:
            for epoch in range(start, cfg.epochs):
                t0 = time.perf_counter()
                train = self.train_epoch(epoch, progress)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                seconds = time.perf_counter() - t0
                if not all(math.isfinite(v) for v in train.values()):
                    raise TrainingDiverged(
                        f"the training loss became {train['loss']} in epoch {epoch + 1}; stopped, the last good "
                        f"checkpoint (epoch {last_saved}) is kept in {self.dir}; try a lower --lr")
                images = len(self.train_loader) * cfg.batch_size
                train_seconds += seconds
                train_images += images
                test = evaluate(self.model, self.test_loader, precision)
                row = {"epoch": epoch + 1, "lr": train.pop("lr"),
                       **{f"train_{k}": v for k, v in train.items()},
                       "test_top1": test["top1"], "test_top5": test["top5"], "test_nll": test["nll"],
                       "images_per_s": images / seconds, "epoch_seconds": seconds}
                history.append(row)
                self._write_metrics(history)
                if writer is not None:
                    for key, value in row.items():
                        if key != "epoch":
                            writer.add_scalar(key, value, epoch + 1)
                if progress is not None:
                    progress.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
                    progress.set_postfix(loss=f"{row['train_loss']:.3f}", top1=f"{test['top1']:.2f}",
                                         img_s=f"{row['images_per_s']:.0f}")
                if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
                    self._save(epoch + 1)
                    last_saved = epoch + 1
        finally:
            if progress is not None:
                progress.close()
            if writer is not None:
                writer.close()
        return self._finish(history, teacher_metrics, time.perf_counter() - wall_start, train_images, train_seconds)

    def _finish(self, history, teacher_metrics, wall, train_images, train_seconds) -> dict[str, Any]:
        last = history[-1]
        best = max(history, key=lambda r: r["test_top1"])
        result: dict[str, Any] = {
            "task": self.cfg.task, "model": self.cfg.model, "dataset": self.cfg.dataset,
            "epochs": self.cfg.epochs, "seed": self.cfg.seed,
            "top1": last["test_top1"], "top5": last["test_top5"], "nll": last["test_nll"],
            "best_top1": best["test_top1"], "best_epoch": best["epoch"],
            "wall_seconds": wall,
            "images_per_s": train_images / train_seconds if train_seconds else None,
            "device": device_name(self.device), "versions": library_versions(),
        }
        if self.teacher is not None:
            result.update(teacher=self.cfg.kd.teacher, teacher_model=self.teacher_arch,
                          teacher_top1=teacher_metrics["top1"], kd_method=self.cfg.kd.method,
                          temperature=self.cfg.kd.temperature)
        result["mix"] = self.cfg.mix.model_dump()
        atomic_write_text(self.dir / RESULT_NAME, json.dumps(result, indent=2) + "\n")
        return result

    def _tensorboard(self):
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MixkdError("--tensorboard needs TensorBoard: pip install tensorboard") from None
        return SummaryWriter(log_dir=str(self.dir / "tensorboard"))

    def _progress_bar(self, start: int):
        if not self.cfg.progress:
            return None
        from tqdm.auto import tqdm

        steps = len(self.train_loader)
        return tqdm(total=self.cfg.epochs * steps, initial=start * steps, unit="step", dynamic_ncols=True,
                    desc=f"{self.cfg.task} {self.cfg.model}", leave=False)


def run(cfg: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Train or distill as ``cfg`` says; returns the run's result (also in ``result.json``)."""
    return Run(cfg, resume=resume).execute()


def evaluate_checkpoint(checkpoint: str, dataset: str, data_dir: str | None, model: str | None = None,
                        device: str = "auto", download: bool = False, batch_size: int = 1024,
                        image_size: int | None = None) -> dict[str, Any]:
    """Test-set top-1/top-5/NLL of a mixkd checkpoint or a RepDistiller ``.pth``."""
    dev = resolve_device(device)
    data = load_dataset(dataset, data_dir, download=download, image_size=image_size)
    net, arch = load_model(checkpoint, model, data.num_classes)
    _, test_loader = make_loaders(data, 2, dev, eval_batch_size=batch_size, workers=0)
    metrics = evaluate(net.to(dev), test_loader)
    return {"checkpoint": str(checkpoint), "model": arch, "dataset": dataset, **metrics}
