"""The distiller: the one interface of a KD method.

A :class:`Distiller` owns the student (and a frozen teacher) and turns a (mixed) batch into named
losses. It is what the training step calls, what the optimizer trains and what a checkpoint
saves, so a new KD method is **one file**: its class, its typed settings and its registry entry
(:data:`mixkd.registry.KD_METHODS`); nothing in the engine, the step, the CLI, the study or the report
changes for it (``mixkd/methods/`` holds the built-in ones; ``--plugin FILE`` loads one from outside)::

    from pydantic import Field
    from mixkd.distiller import Distiller, KDSettings
    from mixkd.registry import KD_METHODS

    class MySettings(KDSettings):                     # temperature, ce_weight, kd_weight, and its own
        hint_weight: float = Field(100.0, ge=0, description="weight of the hint (its source)")

    @KD_METHODS.register("mykd", settings=MySettings, label="MyKD")
    class MyKD(Distiller):
        # its docstring's first line is its summary in ``mixkd distill --help``
        loss_names = ("loss", "ce", "kd")

        def __init__(self, student, teacher, settings):   # settings: the resolved MySettings
            super().__init__(student, teacher, settings)
            self.modules["regressor"] = torch.nn.Conv2d(64, 256, 1)   # trainable, optional

        def forward_train(self, x, target):
            feats_s, logits_s = self.student(x, is_feat=True)
            with torch.no_grad():
                feats_t, logits_t = self.teacher(x, is_feat=True)
            ce = soft_cross_entropy(logits_s, target)
            kd = ...  # may use self.epoch (a device tensor) for schedules
            return {"loss": self.settings.ce_weight * ce + kd, "ce": ce, "kd": kd}

``mixkd distill --kd mykd`` (``kd.method: mykd``) then runs it, with ``--hint-weight`` (``kd.hint_weight``).

The contract (modelled on mdistiller's ``distillers/_base.py``):

- ``forward_train(x, target)``: ``x`` the (mixed) images, ``target`` the (mixed) label
  distributions, one row per image. Returns a dict holding at least ``"loss"`` (what is minimized)
  and every name in ``loss_names`` (the per-epoch means logged as ``train_<name>``). It runs inside
  the step: nothing in it may read a value back to the host (no ``.item()``, no Python branch on a
  tensor), so that a whole epoch runs without synchronization and the step can be captured as a CUDA
  graph. Models return logits, or ``(features, logits)`` with ``is_feat=True`` (see
  :mod:`mixkd.models`).
- ``settings``: the method's typed settings, resolved for the run (defaults < per-context defaults <
  what the user set; :meth:`mixkd.registry.Entry.resolve`).
- ``modules``: a ``torch.nn.ModuleDict`` of the method's own trainable modules (a FitNet regressor,
  say), empty for logit methods. :func:`make_distiller` puts them on the student's device; they
  are trained with the student (:meth:`Distiller.parameters`), switched with it between train and
  eval (:meth:`Distiller.train`), saved in the run's step-exact checkpoints
  (:meth:`Distiller.state_dict`) and captured with it in the CUDA graph (:meth:`Distiller.state_tensors`).
- ``memory``: a ``torch.nn.ModuleDict`` of the method's untrained state that it updates itself in the
  step (CRD's per-sample memory), empty for most methods: buffers saved and captured as ``modules``'
  are, but kept out of the data-parallel wrapper (which would broadcast them from rank 0 every step);
  a method keeps them the same on every rank itself (CRD gathers what it writes,
  :func:`mixkd.distributed.all_gather`).
- :meth:`Distiller.set_training_set`: the training split's labels, sample ``i``'s at ``i`` (the
  indices a method reading ``index`` is handed), given once by the engine before a checkpoint is
  restored and before the first step; a method whose state is per training sample sizes it there.
- ``epoch``: a float32 device tensor holding the number (from 1) of the epoch being trained, and
  ``epochs`` the run's length; the engine sets them with :meth:`Distiller.set_epoch` at each epoch's
  start, as it sets the learning rate, so a schedule (DKD's warm-up of its KD weight) follows them
  inside a captured graph without host syncs.
- The teacher is in eval mode, without gradients, and sees the same mixed batch as the student (with
  ``teacher_view`` independent or clean, the step makes it read its own view instead).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from pydantic import Field

from mixkd.errors import MixkdError
from mixkd.losses import distillation_loss, logit_standardize, soft_cross_entropy
from mixkd.registry import KD_METHODS, Settings


def weight_field(default: float, description: str) -> Any:
    """A setting weighting a loss term: a float in [0, 1000] (``description``: what it weighs, its source)."""
    return Field(default, ge=0, le=1000, description=description)


def temperature_field(default: float, description: str) -> Any:
    """A softmax temperature: in [0.01, 1000] (below 0.01, logits / T overflow float32)."""
    return Field(default, ge=0.01, le=1000, description=description)


class KDSettings(Settings):
    """The settings every logit KD method has: its temperature and the weights of its two terms.
    Their defaults are Hinton KD's as RepDistiller runs it on CIFAR-100."""

    # Below 0.01, logits / T overflow float32 (1e-320 is a float, not a temperature).
    temperature: float = temperature_field(4.0, "softmax temperature (RepDistiller "
                                           "scripts/run_cifar_distill.sh --kd_T 4)")
    ce_weight: float = weight_field(0.1, "weight of the cross-entropy term (RepDistiller "
                                    "scripts/run_cifar_distill.sh -r 0.1, its gamma)")
    kd_weight: float = weight_field(0.9, "weight of the distillation term (RepDistiller "
                                    "scripts/run_cifar_distill.sh -a 0.9, its alpha)")


class LogitStandardization(Settings):
    """The switch of logit standardization, which a logit method's settings add (KD, DKD, DIST)."""

    standardize: bool = Field(False, description="logit standardization (Sun et al., CVPR 2024): the distillation "
                              "term on z-scored logits, (z - mean) / (1e-7 + std) per sample, teacher and student, "
                              "the temperature acting as the base temperature; CE stays on the raw logits "
                              "(logit-standardization-KD mdistiller/distillers/KD.py, DKD.py; its CIFAR recipe "
                              "--base-temp 2 --kd-weight 9 is -T 2 --kd-weight 9 here, for KD and for DKD)")


def standardized(on: bool, student_logits: torch.Tensor, teacher_logits: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits a method's distillation term sees: z-scored when ``on`` (its settings' ``standardize``)."""
    if on:
        return logit_standardize(student_logits), logit_standardize(teacher_logits)
    return student_logits, teacher_logits


def make_distiller(method: str, student: torch.nn.Module, teacher: torch.nn.Module | None,
                   settings: Settings | Mapping[str, Any] | None = None, *, channels_last: bool = False,
                   context: Mapping[str, str] | None = None) -> Distiller:
    """The registered distiller ``method`` (:data:`mixkd.registry.KD_METHODS`) for ``student`` and
    ``teacher`` (None: ``alone``) with ``settings``: the method's resolved settings, or a mapping of
    the ones to change from its defaults for ``context`` (None: the defaults)."""
    if teacher is None:
        method, settings = "alone", None
    entry = KD_METHODS.get(method)
    if not getattr(entry.obj, "needs_teacher", True) and teacher is not None:
        raise MixkdError(KD_METHODS.unknown_message(method, KD_METHODS.names(_takes_teacher)))
    if not isinstance(settings, Settings):
        settings = entry.resolve(settings, context, where="kd")
    elif not isinstance(settings, entry.settings):
        raise MixkdError(f"kd: the {method} KD method takes {entry.settings.__name__}, "
                         f"not {type(settings).__name__}")
    distiller = entry.obj(student, teacher, settings)
    distiller.modules.to(distiller.device)
    distiller.memory.to(distiller.device)
    distiller.channels_last = channels_last
    return distiller


def _takes_teacher(entry) -> bool:
    return getattr(entry.obj, "needs_teacher", True)


def method_names(teacher: bool | None = True) -> list[str]:
    """The registered KD methods: those that need a teacher (``teacher=True``: the values of
    ``kd.method``), those that do not (False), or all (None)."""
    return KD_METHODS.names(None if teacher is None else (lambda e: _takes_teacher(e) == teacher))


class Distiller:
    """The base of every KD method: see the module docstring for the contract.

    Subclasses set ``loss_names`` and ``needs_teacher`` and implement :meth:`forward_train`; the
    rest (parameters, train/eval, checkpoint state, the epoch tensor, channels-last input) is here.
    """

    needs_teacher: ClassVar[bool] = True
    loss_names: ClassVar[tuple[str, ...]] = ("loss", "ce", "kd")
    # What the method reads besides the (mixed) images and labels, as keyword arguments of forward_train:
    # "index" (the samples' dataset indices, (B,) int64), "strong" (a strong view of each sample, mixed as
    # the images are); the loaders then put them in the batch (mixkd.data.layout).
    inputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module | None, settings: Settings):
        if self.needs_teacher and teacher is None:
            raise ValueError(f"the {self.name} distiller needs a teacher")
        if not self.needs_teacher and teacher is not None:
            raise ValueError(f"the {self.name} distiller takes no teacher")
        self.student, self.teacher, self.settings = student, teacher, settings
        self.channels_last = False  # bf16 runs feed the models channels-last images
        self.device = next(student.parameters()).device
        self.modules = torch.nn.ModuleDict()  # the method's own trainable modules
        self.memory = torch.nn.ModuleDict()  # its untrained state outside the data-parallel wrapper (see the module)
        self.epoch = torch.ones((), dtype=torch.float32, device=self.device)  # from 1; see set_epoch
        self.epochs = 1
        self._parallel: torch.nn.Module | None = None  # the DDP wrapper of a data-parallel run

    @property
    def name(self) -> str:
        """The name the method is registered under (its class name when it is not registered)."""
        entry = getattr(type(self), "registry_entry", None)
        return entry.name if entry is not None else type(self).__name__

    # ---- what a subclass writes -------------------------------------------------------------
    def forward_train(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def set_training_set(self, labels: torch.Tensor) -> None:
        """The training split the run trains on: its labels, int64 ``(N,)``, sample ``i``'s at ``i`` (the
        dataset indices the step hands a method reading ``index``). The engine calls it once, after
        building the distiller and before a checkpoint's state is restored or a step is taken; a method
        whose state is per training sample (CRD's memory, in :attr:`memory`) builds it here. Nothing by default."""

    # ---- what the step, the engine and the checkpoints use ------------------------------------
    def losses(self, x: torch.Tensor, target: torch.Tensor, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named losses of one (mixed) batch (see :meth:`forward_train`); ``inputs``: what the method
        reads besides (:attr:`inputs`)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            if "strong" in inputs:
                inputs["strong"] = inputs["strong"].contiguous(memory_format=torch.channels_last)
        if self._parallel is not None:  # through the DDP wrapper, computed by this view's forward_train
            return self._parallel(x, target, forward=self.forward_train, **inputs)
        return self.forward_train(x, target, **inputs)

    def data_parallel(self, device: torch.device, broadcast_buffers: bool = True) -> None:
        """Train data-parallel: the student and the method's modules go under one
        ``DistributedDataParallel`` (their gradients are averaged over the ranks in the backward);
        the frozen teacher stays outside. Needs the process group (:mod:`mixkd.distributed`)."""
        ddp = torch.nn.parallel.DistributedDataParallel
        ids = [device.index] if device.type == "cuda" else None
        # torch 2.14 renamed broadcast_buffers (both still sync the buffers once, when wrapping)
        sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
        self._parallel = ddp(_Trainable(self), device_ids=ids, output_device=ids[0] if ids else None,
                             **{sync: broadcast_buffers})

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """What the optimizer trains: the student's parameters, then the method's own (in that order,
        so that the optimizer state of a method without modules is laid out as the student's)."""
        yield from self.student.parameters()
        yield from self.modules.parameters()

    def train(self, mode: bool = True) -> Distiller:
        """Student and the method's modules to train (or eval) mode; the teacher stays in eval mode."""
        self.student.train(mode)
        self.modules.train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Epoch ``epoch`` (from 1) of ``epochs`` is about to be trained: updates the device tensor in
        place (a captured graph reads the new value)."""
        self.epoch.fill_(float(epoch))
        self.epochs = epochs

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's own state (``{}`` for logit methods): its modules' and its memory's, saved in checkpoints."""
        clash = set(self.modules) & set(self.memory)
        if clash:
            raise ValueError(f"the {self.name} distiller names {sorted(clash)} both a module and a memory")
        return {**self.modules.state_dict(), **self.memory.state_dict()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        if set(own) != set(state):
            raise MixkdError(f"the checkpoint's {self.name} state has {sorted(state) or 'nothing'} but the "
                             f"method needs {sorted(own) or 'nothing'}; was it written by another kd.method?")
        for part in (self.modules, self.memory):
            part.load_state_dict({k: v for k, v in state.items() if k.partition(".")[0] in part})

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a training step changes, besides the optimizer's (what a step that must leave
        no trace saves and restores): parameters and buffers of the student and the method's
        modules, the method's memory, and the teacher's buffers."""
        tensors = list(self.student.parameters()) + list(self.student.buffers())
        tensors += list(self.modules.parameters()) + list(self.modules.buffers()) + list(self.memory.buffers())
        if self.teacher is not None:
            tensors += list(self.teacher.buffers())
        return tensors

    def with_models(self, student: torch.nn.Module, teacher: torch.nn.Module | None) -> Distiller:
        """A view of this distiller computing with other (compiled) student and teacher modules; it
        shares everything else (the method's modules, the epoch tensor, the settings)."""
        view = copy.copy(self)
        view.student, view.teacher = student, teacher
        return view


class _Trainable(torch.nn.Module):
    """The student and a distiller's own modules as one module (what ``DistributedDataParallel`` wraps)
    whose forward is ``forward``: the :meth:`Distiller.forward_train` of the distiller, or of the view
    of it the step computes with (:meth:`Distiller.with_models`: compiled models, or a teacher reading
    its own view of the batch); they train the same parameters, so DDP's hooks see every gradient."""

    def __init__(self, distiller: Distiller):
        super().__init__()
        self.student, self.extra = distiller.student, distiller.modules

    def forward(self, x: torch.Tensor, target: torch.Tensor, *, forward, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return forward(x, target, **inputs)




class LogitTermDistiller(Distiller):
    """A logit method: ``ce_weight * CE(student, target) + kd_factor() * term``, the term one of
    :func:`mixkd.losses.distillation_loss` (``term``) with the settings that term takes
    (``term_settings``)."""

    term: ClassVar[str] = ""
    term_settings: ClassVar[tuple[str, ...]] = ("temperature",)

    def __init__(self, student, teacher, settings: KDSettings):
        super().__init__(student, teacher, settings)
        self.params = {k: getattr(settings, k) for k in self.term_settings}
        self.standardize = bool(getattr(settings, "standardize", False))  # read here: the step only sees a bool

    def kd_factor(self) -> torch.Tensor | float:
        """What multiplies the term: ``kd_weight`` (a schedule may make it a device tensor)."""
        return self.settings.kd_weight

    def forward_train(self, x, target):
        student_logits = self.student(x)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        ce = soft_cross_entropy(student_logits, target)
        kd = distillation_loss(self.term, *standardized(self.standardize, student_logits, teacher_logits), target,
                               **self.params)
        return {"loss": self.settings.ce_weight * ce + self.kd_factor() * kd, "ce": ce, "kd": kd}
