"""Training and distillation: one resumable run, written to a run folder, advanced step by step.

The run folder's layout, its status and the resume decision are :mod:`mixkd.run_folder`'s; the KD
method is a :class:`mixkd.distiller.Distiller`; models come from :mod:`mixkd.loading`, the output
(log, progress bar, TensorBoard) goes through :mod:`mixkd.output`.

A :class:`Run` is a state machine that a driver advances one action at a time: ``start()`` (build
the models and data, restore the last checkpoint), then ``advance()`` (one training step, or at an
epoch's end: evaluate, log, checkpoint) until it returns False, when ``result.json`` is written.
``mixkd train``/``distill`` drive one run (:func:`run`); a :class:`mixkd.pack.Pack` drives several.

Checkpoints are step-exact: mid-epoch (``stop()``, ``--save-every-minutes``) they also hold the
step within the epoch, the mixing generator and the epoch's loss sums. Every epoch's data order and
augmentation are drawn from generators re-seeded from (seed, epoch), so a run resumed from any
checkpoint computes exactly what an uninterrupted run would (bit-exact on the same CPU and thread
count). A finished run keeps only its weights (no momentum), so that study folders travel light.

Nothing is written before everything was built and checked: a run that cannot start leaves
``--out`` as it found it.

Data-parallel runs (:mod:`mixkd.distributed`: torchrun, srun): every rank builds the same run and
trains on its part of each global batch (the loaders draw the epoch for the global batch), the
student and the method's modules under ``DistributedDataParallel``; with ``sync_bn`` BatchNorm
uses the global batch's statistics, so N ranks compute what one process computes (up to float
order) when nothing is mixed; with mixing, each rank mixes within its part, from its own generator
(seeded from (seed, epoch, rank) and saved for every rank in mid-epoch checkpoints). Only rank 0
writes the run folder; evaluation is sharded and summed over the ranks; stops and mid-epoch saves
are agreed by all ranks (:meth:`Run.sync`), at the same step.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mixkd import distributed
from mixkd.augment import effective_spec, make_pipeline
from mixkd.checkpoint import load_checkpoint, load_weights, save_checkpoint
from mixkd.config import RunConfig, TrackConfig, resolve_precision
from mixkd.control import STOP_CODES, STOP_REASONS, STOP_WORDS, StopControl, check_first_step
from mixkd.data import (
    DeviceLoader,
    fingerprint,
    fingerprint_mismatch,
    load_dataset,
    make_loaders,
    make_test_loader,
    split_labels,
)
from mixkd.data.layout import BatchLayout
from mixkd.device import device_name, library_versions, resolve_device
from mixkd.distiller import make_distiller
from mixkd.errors import MixkdError, StorageError, TrainingDiverged
from mixkd.files import link_refused, make_dir, storage_error
from mixkd.loading import load_teacher, teacher_accuracy_input
from mixkd.metrics import evaluate
from mixkd.mix import MixSpec
from mixkd.models import create_model, default_lr
from mixkd.models.preprocess import Preprocessed, Preprocessing
from mixkd.models.sync_bn import convert_sync_batchnorm
from mixkd.output import RunOutput
from mixkd.pack import Pack
from mixkd.registry import KD_METHODS, load_plugins, plugin_records
from mixkd.run_folder import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    RESULT_NAME,
    config_to_save,
    default_run_dir,
    open_run,
    teacher_path,
)
from mixkd.step import SGD, GraphedTrainStep, TrainStep, resolve_compile
from mixkd.tracking import Tracker, run_params, run_tags
from mixkd.validate import unfinished_teacher_note, validate_run_config

DISTILLER_STATE = "distiller."  # checkpoint state keys of the KD method's own modules
EAGER_UNDER_DDP = ("note: under DDP the step runs eagerly (no CUDA graph, no torch.compile): a captured graph "
                   "cannot replay DDP's gradient all-reduce across processes safely, and compile with DDP is untested "
                   "in mixkd")


def batch_layout(cfg: RunConfig) -> BatchLayout:
    """What a training batch of ``cfg`` holds: the teacher's view, and what its KD method reads besides."""
    inputs = KD_METHODS.get(cfg.kd.method).obj.inputs if cfg.task == "distill" else ()
    try:
        return BatchLayout.for_method(tuple(inputs), cfg.teacher_view)
    except ValueError as exc:
        raise MixkdError(f"kd.method {cfg.kd.method} with teacher_view {cfg.teacher_view}: {exc}") from None


def strong_spec(cfg: RunConfig) -> str:
    """The augmentation of the strong view a method reads (``Distiller.inputs`` holding ``strong``): its
    ``kd.strong_augment`` setting, a spec of per-sample policies (the step mixes both views with the run's mix)."""
    spec = cfg.kd.params().get("strong_augment")
    if not isinstance(spec, str):
        raise MixkdError(f"kd.method {cfg.kd.method} reads a strong view but has no strong_augment setting: "
                         "give its settings a strong_augment (e.g. flip_crop+randaugment)")
    return spec


def mix_stream(rank: int) -> int:
    """The :func:`epoch_seed` stream of rank ``rank``'s mixing generator (rank 0: 1, as a process alone)."""
    return 1 if rank == 0 else 1000 + rank


def mix_state_key(rank: int) -> str:
    """The checkpoint's RNG key of rank ``rank``'s mixing generator (rank 0: ``mix``, as a process alone)."""
    return "mix" if rank == 0 else f"mix.{rank}"


def torch_state_key(rank: int) -> str:
    """The checkpoint's RNG key of rank ``rank``'s torch generator (dropout's masks, a method's draws such as
    CRD's negatives; rank 0: ``torch_cpu``, as a process alone)."""
    return "torch_cpu" if rank == 0 else f"torch_cpu.{rank}"


def torch_stream(rank: int) -> int:
    """The :func:`epoch_seed` stream rank ``rank`` > 0 reseeds torch's generator from once its models are built
    (every rank builds them from the run's seed, rank 0 then goes on as a process alone), so that ranks do not
    draw the same dropout masks for their parts."""
    return 2000 + rank


def loss_sums_key(rank: int) -> str:
    """The checkpoint's state key of rank ``rank``'s loss sums of a part-done epoch (rank 0: as a process alone)."""
    return "loss_sums" if rank == 0 else f"loss_sums.{rank}"


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A distinct, reproducible seed for each (run seed, epoch, random stream)."""
    return (seed * 1_000_003 + epoch * 7919 + stream * 104_729) % (2**63 - 1)


class Run:
    """One training (``task='train'``) or distillation (``task='distill'``) run, advanced step by step.

    ``paths_relative_to_run`` says that a relative ``kd.teacher`` in ``cfg`` is relative to the run
    directory (study runs); otherwise it is relative to the working directory and saved absolute.
    ``echo`` receives one line per epoch (besides ``log.txt``); None for silence.
    """

    def __init__(self, cfg: RunConfig, resume: bool = False, *, paths_relative_to_run: bool = False,
                 echo=None):
        self.rank, self.world = distributed.rank(), distributed.world()
        load_plugins(cfg.plugins)  # a config passed to another process (a study's worker): its methods there too
        self.writes = distributed.is_main()  # only rank 0 writes the run folder
        if self.world > 1 and not cfg.out:  # every rank's default folder: rank 0's
            cfg = cfg.model_copy(update={"out": distributed.broadcast_object(str(default_run_dir(cfg)))})
        self.cfg, self.folder, self.fresh = open_run(cfg, resume)
        self.dir = self.folder.path
        self.in_study = paths_relative_to_run
        if self.in_study and self.dir.is_symlink():  # a study's run folder, named by mixkd: never through a link
            raise link_refused(self.dir)
        self.relative_teacher = paths_relative_to_run or not self.fresh  # saved: relative to the run
        if self.fresh or not self.folder.result.exists():
            self._validate()  # every problem in one line, before anything is built or written
        self.device = distributed.local_device(resolve_device(self.cfg.device))
        self.precision = resolve_precision(self.cfg.precision, self.device.type)
        self.output = RunOutput(self.folder, echo if self.writes else None, progress=self.cfg.progress and self.writes,
                                tensorboard=self.cfg.tensorboard and self.writes,
                                title=f"{self.cfg.task} {self.cfg.model}")
        # the experiment tracker (--track), rank 0's alone; a failure is one warning line in the log
        self.tracker = Tracker(self.folder.path, self.cfg.track if self.writes else TrackConfig(), self._log)
        self.phase = "new"  # new -> training -> finished | stopped | failed
        self.created = False  # whether anything was written for this process's part of the run
        self.result: dict[str, Any] | None = None
        # where training stands (restored from the checkpoint in start())
        self.epoch, self.step_in_epoch = 0, 0
        self.history: list[dict[str, Any]] = []  # the metrics rows of the finished epochs
        self.notes: list[str] = []  # warnings about the run folder, logged when the run starts writing
        # Where each part of the run began and with how many CPU threads (a part per change of the count:
        # on the CPU the numbers depend on it), as {"epoch": epochs done, "step": steps into the next, "threads"}.
        self.segments: list[dict[str, Any]] = []
        self.train_seconds, self.train_images, self.epoch_seconds = 0.0, 0, 0.0
        self.last_saved = "none yet"  # the position of the last checkpoint, for messages
        self.saved_at = time.monotonic()  # when the last checkpoint was written (--save-every-minutes)
        # measured costs (for deadlines): None until measured
        self.step_seconds: float | None = None
        self.eval_seconds: float | None = None
        self.checkpoint_seconds: float | None = None
        self.compile_seconds: float | None = None
        self.teacher_metrics: dict[str, float] | None = None
        self.wall_start = time.perf_counter()
        self._batches = None  # the current epoch's batches, from its first step on
        # Asked before each batch of an evaluation: whether a stop is due (set by the driver; a stop then
        # checkpoints the epoch's end, and the evaluation is done again on resume).
        self.interrupted: Callable[[], bool] | None = None
        self._clock: tuple[float, int] | None = None  # (time, steps) at the last timing point
        # The folder is this process's while the run lives (mixkd.run_folder): from now on where it
        # holds a run already, else from the first write (_create), which makes the folder.
        # A finished run is only read (its result printed): its folder is still held (refused while another
        # process holds it), except where it cannot be locked at all (a read-only folder).
        finished = not self.fresh and self.folder.result.exists()
        self._lock = None if self.fresh or not self.writes else self._hold(finished)  # rank 0 writes, and locks

    def _hold(self, finished: bool):
        """The folder's lock; for a finished run (only read) none where the storage refuses the lock file."""
        try:
            return self.folder.lock()
        except StorageError:
            if not finished:
                raise
            return None

    # ---- paths -----------------------------------------------------------------------------
    @property
    def teacher_path(self) -> str | None:
        return teacher_path(self.cfg, self.dir, self.relative_teacher)

    def _saved_config(self) -> RunConfig:
        """The config as written to ``config.yaml``: a CLI run's teacher as an absolute path."""
        return config_to_save(self.cfg, self.dir, self.relative_teacher)

    # ---- building --------------------------------------------------------------------------
    def _validate(self) -> None:
        cfg = self.cfg
        if cfg.task == "distill":
            cfg = cfg.model_copy(update={"kd": cfg.kd.model_copy(update={"teacher": self.teacher_path})})
        validate_run_config(cfg)

    def _build(self) -> None:
        cfg = self.cfg
        self.data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, image_size=cfg.image_size)
        self.augment = make_pipeline(cfg.augment, cfg.augment_settings, image_size=self.data.image_size,
                                     mean=self.data.mean, std=self.data.std, device=self.device, dataset=cfg.dataset,
                                     temperature=cfg.kd.params().get("temperature") or 4.0,
                                     mix=MixSpec(cfg.mix.method, cfg.mix.alpha, cfg.mix.fraction, cfg.mix.sampling))
        pick = self.augment.batch if self.augment.batch is not None and self.augment.batch.needs_models else None
        if pick is not None and self.world > 1:
            raise MixkdError("augment: cutmix_pick runs on one process (its extra student pass is outside the "
                             "data-parallel wrapper); run it without torchrun/srun")
        self.layout = batch_layout(cfg)
        if pick is not None and self.layout != BatchLayout():
            raise MixkdError(f"augment: cutmix_pick picks among images: kd.method {cfg.kd.method} (it reads "
                             f"{', '.join(self.layout.inputs)}) and "
                             "teacher_view other than same do not combine with it")
        if self.world > 1:  # every rank must see the same data, else the shards are wrong or the ranks hang
            mismatch = fingerprint_mismatch(distributed.gather_objects(fingerprint(self.data)))
            if mismatch:
                raise MixkdError(mismatch)
        strong = None
        if self.layout.strong:  # the method's strong view (MLKD's): its kd.strong_augment, per-sample policies
            strong = make_pipeline(strong_spec(cfg), image_size=self.data.image_size, mean=self.data.mean,
                                   std=self.data.std, device=self.device, dataset=cfg.dataset)
        self.train_loader, self.test_loader = make_loaders(
            self.data, cfg.batch_size, self.device, eval_batch_size=cfg.eval_batch_size, workers=cfg.workers,
            rank=self.rank, world=self.world, pipeline=self.augment, layout=self.layout, strong=strong)
        in_loader = [(cfg.augment, self.augment)] + ([(f"{strong.spec} (the strong view)", strong)] if strong else [])
        for spec, pipeline in in_loader:
            if pipeline.extra and isinstance(self.train_loader, DeviceLoader):
                self.notes.append(f"note: augment {spec}: {', '.join(type(p).registry_entry.name for p in pipeline.extra)} "
                                  "run in the loader on the device, per sample (torchvision v2), outside the "
                                  "(graphed) step, which cannot capture their data-dependent choices")
        torch.manual_seed(cfg.seed)
        channels_last = self.precision == "bf16"
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = create_model(cfg.model, self.data.num_classes, self.data.image_size).to(
            self.device, memory_format=memory_format)
        if cfg.sync_bn and self.world > 1:
            self.model = convert_sync_batchnorm(self.model, use_torch=distributed.backend() == "nccl", owner=cfg.model)
        self.teacher, self.teacher_arch, self.teacher_test, self.teacher_eval = None, None, None, None
        if cfg.task == "distill":
            data_view = Preprocessing(self.data.image_size, self.data.mean, self.data.std, crop_pct=self.data.crop_pct)
            self.teacher, self.teacher_arch = load_teacher(
                self.teacher_path, cfg.kd.teacher_model, self.data.num_classes, self.device, channels_last, data=data_view,
                teacher_input=cfg.kd.teacher_input, view=self.layout.teacher_view)
            if getattr(self.teacher, "preprocess_note", None):
                self.notes.append(f"note: {self.teacher.preprocess_note}")
            self.teacher_test, self.teacher_eval, notes = teacher_accuracy_input(self.teacher, self.data, data_view)
            self.notes += [f"note: {n}" for n in notes]
        self.distiller = make_distiller(cfg.kd.method, self.model, self.teacher, cfg.kd.settings() if self.teacher is not None else None,
                                        channels_last=channels_last)
        self.distiller.set_training_set(split_labels(self.data.train))  # before the restore: per-sample state
        if cfg.sync_bn and self.world > 1:  # the method's own BatchNorms too (FitNet's regressor)
            convert_sync_batchnorm(self.distiller.modules, use_torch=distributed.backend() == "nccl",
                                   owner=f"kd.method {cfg.kd.method}'s modules")
        self.base_lr = cfg.optim.lr or default_lr(cfg.model)
        self.optimizer = SGD(self.distiller.parameters(), lr=self.base_lr, momentum=cfg.optim.momentum,
                             weight_decay=cfg.optim.weight_decay)
        self.mix = self.augment.mix_spec  # mixup / CutMix from augment or --mix, with the mix.* settings
        self.mix_generator = torch.Generator(device=self.device)
        compile_step = resolve_compile(cfg.compile, self.device.type, cfg.dataset)
        if self.world > 1:
            if compile_step or (cfg.graph and self.device.type == "cuda" and isinstance(self.train_loader, DeviceLoader)):
                self.notes.append(EAGER_UNDER_DDP)
            compile_step = False
            self.distiller.data_parallel(self.device, broadcast_buffers=not cfg.sync_bn)
        step_cls = GraphedTrainStep if self.uses_graph else TrainStep
        self.step = step_cls(self.distiller, self.optimizer, self.mix, self.data.num_classes, self.mix_generator,
                             self.precision, compile=compile_step, layout=self.layout, pick=pick)
        self.steps_per_epoch = len(self.train_loader)
        if self.rank > 0:  # after everything drew its initial values, the same on every rank
            torch.manual_seed(epoch_seed(cfg.seed, 0, torch_stream(self.rank)))

    @property
    def uses_graph(self) -> bool:
        """CUDA graphs need CUDA and fixed-size batches from the device-resident loader."""
        return (self.cfg.graph and self.device.type == "cuda" and isinstance(self.train_loader, DeviceLoader)
                and self.world == 1)

    def lr_at(self, epoch: int) -> float:
        passed = sum(1 for m in self.cfg.milestones() if epoch >= m)
        return self.base_lr * self.cfg.optim.lr_decay ** passed

    # ---- state -----------------------------------------------------------------------------
    def _save(self, final: bool = False, stopped: str | None = None) -> None:
        """A checkpoint of the state now: ``self.epoch`` epochs done and ``self.step_in_epoch`` steps of
        the next. ``final``: weights only."""
        t0 = time.perf_counter()
        meta = {"dataset": self.cfg.dataset, "task": self.cfg.task, "step": self.step_in_epoch,
                "train_seconds": self.train_seconds, "train_images": self.train_images,
                "epoch_seconds": self.epoch_seconds, "world": self.world, "segments": self.segments}
        if stopped:
            meta["stopped"] = stopped
        state, rng = {}, {}
        if not final:  # every rank's torch generator
            rng = {torch_state_key(r): t for r, t in enumerate(distributed.gather_objects(torch.get_rng_state()))}
            state = {f"{DISTILLER_STATE}{k}": v for k, v in self.distiller.state_dict().items()}
            if self.step_in_epoch:  # every rank's mixing generator and loss sums
                ranks = distributed.gather_objects((self.mix_generator.get_state(), self.step.sums.cpu()))
                for r, (mix_state, sums) in enumerate(ranks):
                    rng[mix_state_key(r)] = mix_state
                    state[loss_sums_key(r)] = sums
        if self.writes:
            self._write_checkpoint(final, meta, rng, state)
        distributed.barrier()  # no rank goes on (and may stop) before the checkpoint is on disk
        self.saved_at = time.monotonic()
        self.last_saved = f"epoch {self.epoch}" + (f" step {self.step_in_epoch}" if self.step_in_epoch else "")
        self.checkpoint_seconds = max(self.checkpoint_seconds or 0.0, time.perf_counter() - t0)

    def _write_checkpoint(self, final: bool, meta: dict[str, Any], rng: dict[str, torch.Tensor],
                          state: dict[str, torch.Tensor]) -> None:
        save_checkpoint(self.folder.checkpoint, self.model, model_name=self.cfg.model,
                        num_classes=self.data.num_classes, epoch=self.epoch,
                        optimizer=None if final else self.optimizer, rng=rng, extra=meta, state=state)

    def _restore(self) -> None:
        """Load the last checkpoint, if any, and the metrics logged up to it."""
        path = self.folder.checkpoint
        if self.fresh or not path.exists():
            return
        ckpt = load_checkpoint(path)
        load_weights(self.model, ckpt.state_dict, str(path))
        if ckpt.optimizer_state is not None:
            self.optimizer.load_state_dict(ckpt.optimizer_state)
        elif ckpt.epoch < self.cfg.epochs:
            raise MixkdError(f"{path} holds the final weights of a finished run (no optimizer state) but the run "
                             f"has {self.cfg.epochs} epochs and the checkpoint {ckpt.epoch}; it cannot continue")
        if ckpt.optimizer_state is not None:
            self.distiller.load_state_dict({k.removeprefix(DISTILLER_STATE): v for k, v in ckpt.state.items()
                                            if k.startswith(DISTILLER_STATE)})
        self.epoch, self.step_in_epoch = ckpt.epoch, ckpt.step
        saved_world = int(ckpt.meta.get("world", 1))
        key = torch_state_key(self.rank)
        if key in ckpt.rng and saved_world == self.world:
            torch.set_rng_state(ckpt.rng[key])
        elif self.rank > 0:  # written by another number of processes: this rank's draws afresh
            torch.manual_seed(epoch_seed(self.cfg.seed, self.epoch, torch_stream(self.rank)) + self.step_in_epoch)
        elif "torch_cpu" in ckpt.rng:
            torch.set_rng_state(ckpt.rng["torch_cpu"])
        segments = ckpt.meta.get("segments")  # None: a checkpoint of an older mixkd (the count unknown)
        self.segments = list(segments) if isinstance(segments, list) else [{"epoch": 0, "step": 0, "threads": None}]
        self.train_seconds = float(ckpt.meta.get("train_seconds", 0.0))
        self.train_images = int(ckpt.meta.get("train_images", 0))
        if self.step_in_epoch:
            key = mix_state_key(self.rank)
            if saved_world == self.world or not self.mix.active:
                self.mix_generator.set_state(ckpt.rng[key] if key in ckpt.rng else ckpt.rng["mix"])
            else:
                self.mix_generator.manual_seed(epoch_seed(self.cfg.seed, self.epoch, mix_stream(self.rank)) + self.step_in_epoch)
                self.notes.append(f"note: the checkpoint was written by {saved_world} process(es) and the run continues "
                                  f"with {self.world}: the mixing of the rest of epoch {self.epoch + 1} is drawn afresh "
                                  "for each process's part (order and augmentation are as before)")
            if saved_world == self.world:
                sums = ckpt.state[loss_sums_key(self.rank)]
            else:  # the global batch's sums (every rank's mean), each rank's share from now on
                sums = torch.stack([ckpt.state[loss_sums_key(r)] for r in range(saved_world)]).mean(0)
            # older versions summed ("loss", "ce", "kd") for every run
            self.step.sums.copy_(sums[:len(self.step.sums)].to(self.step.sums.device))
            self.step.steps = self.step_in_epoch
            self.epoch_seconds = float(ckpt.meta.get("epoch_seconds", 0.0))
        rows, damaged = self.folder.read_metrics()
        if damaged:
            self.notes.append(f"warning: {self.folder.metrics}: line(s) {', '.join(map(str, damaged[:5]))} are damaged "
                              f"and were skipped; the {len(rows)} readable epoch(s) are kept")
        self.history = [rows[e] for e in sorted(rows) if e <= ckpt.epoch]
        missing = [e for e in range(1, ckpt.epoch + 1) if e not in rows]
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            self.notes.append(f"warning: {self.folder.metrics} lacks epoch(s) {shown} of the {ckpt.epoch} the "
                              "checkpoint has done: the training continues from the checkpoint, but those epochs "
                              f"stay missing from {METRICS_NAME} and from {RESULT_NAME}'s best epoch")
        self.last_saved = f"epoch {self.epoch}" + (f" step {self.step_in_epoch}" if self.step_in_epoch else "")

    def _begin_segment(self) -> None:
        """Record the thread count this process continues with; warn where it differs from the count the
        run had so far (on the CPU, float sums then run in another order: no longer bit-exact)."""
        threads = torch.get_num_threads()
        if self.segments and self.segments[-1]["threads"] == threads:
            return
        if self.segments and self.segments[-1]["threads"] is not None and self.device.type == "cpu":
            before = self.segments[-1]["threads"]
            self.notes.append(f"warning: the run so far used {before} CPU thread{'s' * (before != 1)} and continues with "
                              f"{threads}: sums are taken in another order, so it will not match an uninterrupted run "
                              f"bit for bit ({RESULT_NAME} records the threads of each part); --threads {before} "
                              "continues as it began")
        self.segments.append({"epoch": self.epoch, "step": self.step_in_epoch, "threads": threads})

    def _log(self, line: str) -> None:
        if self.writes:
            self.output.log(line)

    # ---- the state machine -----------------------------------------------------------------
    def start(self) -> None:
        """Build everything and restore the last checkpoint; writes nothing yet. A finished run only
        reads its result."""
        if self.phase != "new":
            return
        if not self.fresh and self.folder.result.exists():
            self.result = self.folder.read_result()
            self.phase = "finished"
            self.close()
            return
        self._build()
        self._restore()
        self._begin_segment()
        if self.fresh and self.cfg.milestone_note():
            self.notes.append(self.cfg.milestone_note())
        if self.fresh and self.teacher is not None and unfinished_teacher_note(self.teacher_path):
            self.notes.append(unfinished_teacher_note(self.teacher_path))
        self.saved_at = time.monotonic()
        self.wall_start = time.perf_counter()
        if self.teacher is not None:
            t0 = time.perf_counter()
            self.teacher_metrics = self._teacher_accuracy()
            self.eval_seconds = time.perf_counter() - t0
        distributed.barrier()  # every rank has opened the run folder before rank 0 writes to it
        self.phase = "training"

    def _teacher_accuracy(self) -> dict[str, float]:
        """The teacher's test metrics: on an image folder through its own eval transform where it has one
        that differs from the dataset's (mixkd.loading.own_test_view), else on the run's test batches."""
        if self.teacher_test is None:
            return evaluate(self.teacher_eval, self.test_loader, self.precision)
        loader = make_test_loader(self.teacher_test[0], self.device, self.cfg.eval_batch_size, workers=self.cfg.workers,
                                  rank=self.rank, world=self.world)
        own_input = self.teacher.model if isinstance(self.teacher, Preprocessed) else self.teacher  # the transform gives it
        return evaluate(own_input, loader, self.precision)

    def _create(self) -> None:
        """The first write: the run directory and its config (or, resuming, the log line); rank 0's alone."""
        self.created = True
        if not self.writes:
            self.output.open(self.cfg.epochs * self.steps_per_epoch, 0)
            return
        self._made_dir = not self.dir.exists()  # removed again where the start fails (a full disk)
        if self.in_study:
            make_dir(self.dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if storage_error(e) is not None:  # no room: the machine's state (a study stops, not fails)
                raise storage_error(e) from None
            raise MixkdError(f"cannot create the run directory {self.dir}: {e.strerror or e}; choose another --out") from None
        if self._lock is None:
            self._lock = self.folder.lock()
            if self.fresh and self.folder.has_begun():  # another process began a run there meanwhile
                self.close()
                raise MixkdError(f"{self.dir} already holds a run; pass --resume to continue it, or choose another --out")
        if self.fresh:
            self.folder.write_config(self._saved_config())
            self.folder.metrics.unlink(missing_ok=True)
            self.folder.checkpoint.unlink(missing_ok=True)
        n = self.cfg.epochs
        where = f"epoch {self.epoch + 1}" + (f" step {self.step_in_epoch}" if self.step_in_epoch else "")
        if self.epoch >= n:  # every epoch trained, the run not finished (stopped in its final evaluation)
            where = f"the end of epoch {n} of {n}, to finish"
        ranks = f" x {self.world} processes ({distributed.backend()}, batch {self.cfg.batch_size // self.world} each)" if self.world > 1 else ""
        self._log(f"{'start' if self.fresh and not self.epoch else 'resume at ' + where}: {self.cfg.task} "
                  f"{self.cfg.model} on {self.cfg.dataset}, {n} epoch{'s' * (n != 1)}, device {device_name(self.device)}{ranks}, "
                  f"{self.precision}" + (f", teacher top-1 {self.teacher_metrics['top1']:.2f}%" if self.teacher_metrics else ""))
        for note in self.notes:
            self._log(note)
        self.tracker.open(self.dir.name, run_params(self.cfg), run_tags(self.cfg, self.teacher_arch))
        self.tracker.epochs(self.history)  # those not logged yet (a run that starts tracking on resume)
        self.output.open(self.cfg.epochs * self.steps_per_epoch, self.epoch * self.steps_per_epoch + self.step_in_epoch)

    @property
    def done(self) -> bool:
        return self.phase in ("finished", "stopped", "failed")

    @property
    def epochs(self) -> int:
        return self.cfg.epochs

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size

    @property
    def compiling(self) -> bool:
        """Whether the next step compiles the models (the first step of a compiled run)."""
        return self.phase == "training" and self.step.compiled and not self.step.warm

    def next_cost(self) -> float:
        """Estimated seconds of the next :meth:`advance` (for deadlines)."""
        if self.phase != "training":
            return 0.0
        step = self.step_seconds or 0.0
        if self.step_in_epoch < self.steps_per_epoch:
            return step
        if self.eval_seconds is not None:
            evaluation = self.eval_seconds
        else:  # not measured yet: as long as training on the test set would take
            evaluation = step * self.test_loader.num_samples / self.cfg.batch_size
        saves = (self.epoch + 1) % self.cfg.save_every == 0 or self.epoch + 1 == self.cfg.epochs
        return evaluation + (self.checkpoint_cost() if saves else 0.0)

    def checkpoint_cost(self) -> float:
        """Estimated seconds of a step-exact checkpoint."""
        if self.phase != "training":
            return 0.0
        if self.checkpoint_seconds is None:
            self.checkpoint_seconds = self._time_trial_checkpoint()
        return self.checkpoint_seconds

    def _time_trial_checkpoint(self) -> float:
        """Time a checkpoint of this run written to the system's temporary folder (the run's own
        folder stays untouched)."""
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="mixkd-ckpt-") as tmp:
            save_checkpoint(Path(tmp) / CHECKPOINT_NAME, self.model, model_name=self.cfg.model,
                            num_classes=self.data.num_classes, epoch=self.epoch, optimizer=self.optimizer,
                            rng={"torch_cpu": torch.get_rng_state()}, state={"loss_sums": self.step.sums})
        return 1.5 * (time.perf_counter() - t0) + 0.05

    def measure_step(self) -> float:
        """Seconds of one step, measured once without changing the run (budgeting a deadline)."""
        if self.phase != "training" or self.step_seconds is not None:
            return self.step_seconds or 0.0
        if self.step_in_epoch >= self.steps_per_epoch:
            return 0.0
        x, y = next(iter(self.train_loader))
        seconds = torch.tensor([self.step.measure(x, y)], dtype=torch.float64)
        self.step_seconds = float(distributed.all_reduce(seconds, "max"))  # the slowest rank's
        return self.step_seconds

    def _begin_epoch(self) -> None:
        self.distiller.train()
        self.optimizer.set_lr(self.lr_at(self.epoch))
        self.distiller.set_epoch(self.epoch + 1, self.cfg.epochs)
        self.train_loader.set_epoch_seed(epoch_seed(self.cfg.seed, self.epoch, 0))
        if self.step_in_epoch == 0:
            self.mix_generator.manual_seed(epoch_seed(self.cfg.seed, self.epoch, mix_stream(self.rank)))
            self.epoch_seconds = 0.0
        self._batches = self.train_loader.iter_from(self.step_in_epoch)
        self._clock = (time.perf_counter(), self.step_in_epoch)
        self.output.describe(f"epoch {self.epoch + 1}/{self.cfg.epochs}")

    def advance(self) -> bool:
        """One action: a training step, or the end of an epoch. False once the run has finished."""
        if self.phase == "new":
            self.start()
        if self.phase != "training":
            return False
        if not self.created:
            self._create()
        if self.epoch >= self.cfg.epochs:
            self._finish()
            return False
        if self._batches is None:
            self._begin_epoch()
        if self.step_in_epoch < self.steps_per_epoch:
            x, y = next(self._batches)
            if self.compiling:
                self._compile_step(x, y)
                return True
            if isinstance(self.step, GraphedTrainStep) and not self.step.warm:
                self._first_step(x, y)  # the capture
            else:
                self.step(x, y)
            self.step_in_epoch += 1
            self.output.stepped()
            self._tick()
            return True
        self._end_epoch()
        if self.epoch >= self.cfg.epochs:
            self._finish()
            return False
        return True

    def _compile_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The first step of a compiled run: compilation (and graph capture), shown as its own phase."""
        self.output.phase("compiling the models (once per architecture and process)")
        t0 = time.perf_counter()
        self._first_step(x, y)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.compile_seconds = time.perf_counter() - t0
        if self.step.compiled:  # else it fell back to eager, and said so
            self._log(f"compiled in {self.compile_seconds:.1f} s (inductor; cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')})")
        self.step_in_epoch += 1
        self.output.stepped()
        self._clock = (time.perf_counter(), self.step_in_epoch)  # compilation is not a step's time

    def _first_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The first step of a compiled or graphed run, which compiles or captures; where a model cannot be
        compiled or captured (a timm/tv model dynamo cannot trace, say), the step falls back to eager with
        one log line naming the models and why, from the state before the failed attempt."""
        restore = self.step._snapshot()  # weights, buffers, optimizer, loss sums, the mixing and torch RNGs
        try:
            self.step(x, y)
            return
        except (MixkdError, TrainingDiverged):
            raise
        except Exception as e:  # dynamo/inductor or CUDA-graph capture errors come in many types
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            restore()
            what = "compiled" if self.step.compiled else "captured as a CUDA graph"
            why = " ".join(str(e).split())[:200] or type(e).__name__
            models = self.cfg.model + (f" (teacher {self.teacher_arch})" if self.teacher_arch else "")
            self._log(f"note: the step of {models} could not be {what} ({type(e).__name__}: {why}); it runs eagerly")
        sums, steps = self.step.sums.clone(), self.step.steps
        self.step = TrainStep(self.distiller, self.optimizer, self.mix, self.data.num_classes, self.mix_generator,
                              self.precision, compile=False)
        self.step.sums.copy_(sums)
        self.step.steps = steps
        self.step(x, y)

    def _tick(self) -> None:
        """Per-step bookkeeping: step time (synchronized now and then on CUDA) and the timed checkpoint."""
        t0, s0 = self._clock
        steps = self.step_in_epoch - s0
        cuda = self.device.type == "cuda"
        if not cuda or steps >= 20 or self.step_in_epoch == self.steps_per_epoch:
            if cuda:
                torch.cuda.current_stream(self.device).synchronize()
            now = time.perf_counter()
            per_step = (now - t0) / max(steps, 1)
            self.epoch_seconds += now - t0
            self.step_seconds = per_step if self.step_seconds is None else max(per_step, 0.8 * self.step_seconds)
            self._clock = (now, self.step_in_epoch)
        if self.world == 1 and self.save_due():  # data-parallel: agreed in sync()
            self._save()

    def save_due(self) -> bool:
        """Whether a mid-epoch checkpoint is due (``--save-every-minutes``)."""
        minutes = self.cfg.save_every_minutes
        return bool(minutes and self.phase == "training" and self.created and 0 < self.step_in_epoch < self.steps_per_epoch
                    and time.monotonic() - self.saved_at >= 60.0 * minutes)

    def window_cost(self, steps: int) -> float:
        """Estimated seconds of the next ``steps`` actions (for deadlines checked every ``steps``)."""
        if self.phase != "training":
            return 0.0
        cost = steps * (self.step_seconds or 0.0)
        if self.step_in_epoch + steps >= self.steps_per_epoch:
            step = self.step_seconds or 0.0
            cost += self.eval_seconds if self.eval_seconds is not None else step * self.test_loader.num_samples / self.cfg.batch_size
            cost += self.checkpoint_cost()
        return cost

    def sync(self, stop: int) -> int:
        """Data-parallel runs: agree with every rank, at the same step, on stopping (``stop``: this
        rank's :data:`STOP_CODES` code, 0 for none; returns the ranks' highest) and on a due mid-epoch
        checkpoint (written here when no stop is agreed: the stop writes its own)."""
        stop, save = distributed.agree([stop, int(self.save_due())])
        if save and not stop:
            self._save()
        return stop

    def _end_epoch(self) -> None:
        cfg, epoch = self.cfg, self.epoch
        sums, steps = self.step.sums.clone(), self.step.steps  # kept where the evaluation is interrupted
        means = self.step.epoch_means()
        if not all(math.isfinite(v) for v in means.values()):
            raise TrainingDiverged(
                f"the training loss became {means['loss']} in epoch {epoch + 1}; stopped, the last good "
                f"checkpoint ({self.last_saved}) is kept in {self.dir}; try a lower --lr")
        self._share_buffers()
        self.output.phase("evaluating on the test set")
        t0 = time.perf_counter()
        test = evaluate(self.model, self.test_loader, self.precision, stop=self.interrupted)
        if test is None:  # a stop came: the driver checkpoints the epoch's end; resuming evaluates again
            self.step.sums.copy_(sums)
            self.step.steps = steps
            return
        self.eval_seconds = time.perf_counter() - t0
        images = self.steps_per_epoch * cfg.batch_size
        seconds = max(self.epoch_seconds, 1e-9)
        self.train_seconds += seconds
        self.train_images += images
        row = {"epoch": epoch + 1, "lr": self.lr_at(epoch), **{f"train_{k}": v for k, v in means.items()},
               "test_top1": test["top1"], "test_top5": test["top5"], "test_nll": test["nll"],
               "images_per_s": images / seconds, "epoch_seconds": seconds}
        self.history.append(row)
        self.epoch, self.step_in_epoch, self._batches = epoch + 1, 0, None
        if self.writes:
            self.folder.write_metrics(self.history)
        self._log(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, test top-1 {test['top1']:.2f}%, "
                  f"{row['images_per_s']:.0f} images/s, {seconds:.1f} s")
        self.output.epoch(row)
        self.tracker.epochs([row])
        if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
            self._save(final=epoch + 1 == cfg.epochs)

    def _share_buffers(self) -> None:
        """Data-parallel runs: rank 0's buffers (BatchNorm's running statistics) of the student and the
        method's modules on every rank. DDP sends rank 0's at the start of each forward only, so after an
        epoch's last step each rank holds the statistics of its own part (without --sync-bn); shared
        before the evaluation and the checkpoint, every rank evaluates the weights rank 0 saves, and
        the metrics are those of the saved model (the next forward would send these anyway: training
        is unchanged)."""
        if self.world > 1:
            distributed.broadcast_(list(self.model.buffers()) + list(self.distiller.modules.buffers()))

    def stop(self, reason: str) -> None:
        """Write a step-exact checkpoint and stop here (``reason``: time, signal or interrupt)."""
        if self.phase != "training":
            return
        if self.created:
            self._save(stopped=reason)
            where = f"epoch {self.epoch + 1} step {self.step_in_epoch}/{self.steps_per_epoch}" + (
                ", before its evaluation" if self.step_in_epoch == self.steps_per_epoch else "")
            self._log(f"{STOP_WORDS.get(reason, 'stopped')} at {where}; the checkpoint continues from there")
        self.phase = "stopped"
        self.close()

    def fail(self) -> None:
        self.phase = "failed"
        self.close()
        if getattr(self, "_made_dir", False) and self.writes:  # a start that failed leaves --out as it was
            try:
                os.rmdir(self.dir)  # only where nothing is left in it
            except OSError:
                pass

    def _finish(self) -> dict[str, Any]:
        history = self.history
        last = history[-1]
        best = max(history, key=lambda r: r["test_top1"])
        result: dict[str, Any] = {
            "task": self.cfg.task, "model": self.cfg.model, "dataset": self.cfg.dataset,
            "epochs": self.cfg.epochs, "seed": self.cfg.seed,
            "top1": last["test_top1"], "top5": last["test_top5"], "nll": last["test_nll"],
            "best_top1": best["test_top1"], "best_epoch": best["epoch"],
            "wall_seconds": time.perf_counter() - self.wall_start,
            "images_per_s": self.train_images / self.train_seconds if self.train_seconds else None,
            "device": device_name(self.device), "precision": self.precision,
            "threads": self._threads(), "segments": self.segments, "versions": library_versions(),
        }
        if self.teacher is not None:
            if self.teacher_metrics is None:
                self.teacher_metrics = self._teacher_accuracy()
            # as config.yaml names it (a command line's absolute, a study's relative to the run), so that
            # a resumed run records what an uninterrupted one does
            result.update(teacher=self._saved_config().kd.teacher, teacher_model=self.teacher_arch,
                          teacher_top1=self.teacher_metrics["top1"], kd_method=self.cfg.kd.method,
                          temperature=self.cfg.kd.params().get("temperature"))
        result["mix"] = {**self.cfg.mix.model_dump(), "method": self.mix.method}
        result["augment"] = effective_spec(self.cfg.augment, self.mix.method)
        result["teacher_view"] = self.cfg.teacher_view
        if self.cfg.plugins:  # the files that registered what the run used, as they were (see mixkd.registry)
            result["plugins"] = plugin_records(self.cfg.plugins)
        if self.world > 1:
            result.update(processes=self.world, dist_backend=distributed.backend(), sync_bn=self.cfg.sync_bn)
        if self.writes:
            self.folder.write_result(result)
            self.tracker.summary(result)
            self.tracker.files([self.folder.config, self.folder.result])
        distributed.barrier()  # result.json is written before any rank reports the run finished
        self._log(f"finished: top-1 {result['top1']:.2f}% (last epoch), best {result['best_top1']:.2f}% "
                  f"(epoch {result['best_epoch']})")
        self.result = result
        self.phase = "finished"
        self.close()
        return result

    def _threads(self) -> int | list[int | None]:
        """The CPU threads of the run: one count where every part had it, else each part's (``segments``)."""
        counts = [s["threads"] for s in self.segments] or [torch.get_num_threads()]
        return counts[0] if len(set(counts)) == 1 and counts[0] is not None else counts

    def close(self) -> None:
        self.output.close()
        self._batches = None
        for loader in (getattr(self, "train_loader", None), getattr(self, "test_loader", None)):
            if hasattr(loader, "close"):  # image folders: their worker processes end here
                loader.close()
        self.tracker.close(self.phase)
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _check_first_step_together(job: Run, control: StopControl) -> None:
    """:func:`mixkd.control.check_first_step`, the same verdict on every rank of a data-parallel run
    (each rank measures its own start-up time): where one rank refuses, all do."""
    try:
        check_first_step(job, control)
        refused = None
    except MixkdError as e:
        refused = e
    if distributed.agree([int(refused is not None)])[0]:
        raise refused or MixkdError(f"another process of this run refused the time limit (rank {distributed.rank()} "
                                    f"of {distributed.world()} would have started): give a longer --time-limit")


def sync_every(device: torch.device) -> int:
    """Actions between the stop agreements of a data-parallel run: every step on the CPU (where an
    all-reduce of two numbers is negligible), every 8 on GPUs (each agreement waits for the device)."""
    return 1 if device.type == "cpu" else 8


class StoppedRun(Exception):
    """Raised by :func:`run` when the run stopped before finishing (deadline, signal, Ctrl-C)."""

    def __init__(self, run: Run, reason: str):
        super().__init__(reason)
        self.run, self.reason = run, reason


def run(cfg: RunConfig, resume: bool = False, control: StopControl | None = None, echo=None) -> dict[str, Any]:
    """Train or distill as ``cfg`` says; returns the run's result (also in ``result.json``).
    With ``control``, stops on its deadline or signals (raising :class:`StoppedRun` after a
    step-exact checkpoint)."""
    return run_job(cfg, resume, control, echo).result


def run_job(cfg: RunConfig, resume: bool = False, control: StopControl | None = None, echo=None) -> Run:
    """:func:`run`, returning the finished :class:`Run` (its ``result`` and ``dir``). A write the storage
    refused is raised as the :class:`StorageError` it is, with ``job``: the run (whether it began)."""
    job = Run(cfg, resume=resume, echo=echo)
    try:
        return _drive(job, control)
    except StorageError as e:
        e.job = job
        raise


def _drive(job: Run, control: StopControl | None) -> Run:
    pack = Pack(job.device, 1)
    ended = pack.admit(job)
    if ended is not None and ended.get("error") is not None:
        raise ended["error"]
    control = control or StopControl()
    if job.phase == "training" and control.deadline is not None:
        _check_first_step_together(job, control)
    every = sync_every(job.device)
    if job.world == 1:  # data-parallel evaluations are collectives: every rank evaluates to the end
        job.interrupted = lambda: control.reason is not None
    actions = 0
    while pack.live:
        if job.world > 1:  # the ranks agree every `every` actions, all at the same step
            if actions % every == 0:
                control.should_stop(lambda: job.window_cost(every) + job.checkpoint_cost())
                agreed = STOP_REASONS[job.sync(STOP_CODES[control.reason])]
                if agreed is not None:
                    control.reason = agreed
                    pack.stop_all(agreed)
                    raise StoppedRun(job, agreed)
        elif control.should_stop(lambda: pack.next_cost() + pack.checkpoint_cost()):
            pack.stop_all(control.reason)
            raise StoppedRun(job, control.reason)
        actions += 1
        for _, outcome in pack.round():
            if outcome.get("error") is not None:
                raise outcome["error"]
    return job
