"""The distiller: the one interface of a KD method, and the registry of methods.

A :class:`Distiller` owns the student (and a frozen teacher) and turns a (mixed) batch into named
losses. It is what the training step calls, what the optimizer trains and what a checkpoint
saves, so a new KD method is **one new class plus its registry entry**; nothing in the engine, the
step, the study or the report changes for it::

    @register("mykd")
    class MyKD(Distiller):
        loss_names = ("loss", "ce", "kd")

        def __init__(self, student, teacher, kd):   # kd: the run's KDConfig (temperature, weights...)
            super().__init__(student, teacher, kd)
            self.modules["regressor"] = torch.nn.Conv2d(64, 256, 1)   # trainable, optional

        def forward_train(self, x, target):
            feats_s, logits_s = self.student(x, is_feat=True)
            with torch.no_grad():
                feats_t, logits_t = self.teacher(x, is_feat=True)
            ce = soft_cross_entropy(logits_s, target)
            kd = ...  # may use self.epoch (a device tensor) for schedules
            return {"loss": ce + kd, "ce": ce, "kd": kd}

``mixkd distill --kd mykd`` (``kd.method: mykd``) then runs it; its name is validated against the
registry (:func:`distiller_names`), and its hyperparameters come from the run's ``kd`` section.

The contract (modelled on mdistiller's ``distillers/_base.py``):

- ``forward_train(x, target)``: ``x`` the (mixed) images, ``target`` the (mixed) label
  distributions, one row per image. Returns a dict holding at least ``"loss"`` (what is minimized)
  and every name in ``loss_names`` (the per-epoch means logged as ``train_<name>``). It runs inside
  the step: nothing in it may read a value back to the host (no ``.item()``, no Python branch on a
  tensor), so that a whole epoch runs without synchronization and the step can be captured as a CUDA
  graph. Models return logits, or ``(features, logits)`` with ``is_feat=True`` (see
  :mod:`mixkd.models`).
- ``modules``: a ``torch.nn.ModuleDict`` of the method's own trainable modules (a FitNet regressor,
  say), empty for logit methods. :func:`make_distiller` puts them on the student's device; they
  are trained with the student (:meth:`Distiller.parameters`), switched with it between train and
  eval (:meth:`Distiller.train`), saved in the run's step-exact checkpoints
  (:meth:`Distiller.state_dict`) and captured with it in the CUDA graph (:meth:`Distiller.state_tensors`).
- ``epoch``: a float32 device tensor holding the number (from 1) of the epoch being trained, and
  ``epochs`` the run's length; the engine sets them with :meth:`Distiller.set_epoch` at each epoch's
  start, as it sets the learning rate, so a schedule (DKD's warm-up of its KD weight) follows them
  inside a captured graph without host syncs.
- The teacher is in eval mode, without gradients, and sees the same mixed batch as the student.

Registered methods: ``alone`` (:class:`Supervised`, the student trained alone: no teacher), ``kd``
(:class:`HintonKD`) and ``std`` (:class:`StandardizedKD`).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F

from mixkd.config import KDConfig
from mixkd.errors import MixkdError
from mixkd.losses import (
    DISTILLATION_DEFAULTS,
    KDObjective,
    distillation_loss,
    kd_loss,
    soft_cross_entropy,
    supervised_objective,
)
from mixkd.models import feature_index, feature_names

DISTILLERS: dict[str, type[Distiller]] = {}


def register(name: str) -> Callable[[type[Distiller]], type[Distiller]]:
    """Class decorator: make a :class:`Distiller` subclass available as ``kd.method: name``."""

    def add(cls: type[Distiller]) -> type[Distiller]:
        if name in DISTILLERS:
            raise ValueError(f"a distiller named {name!r} is registered already ({DISTILLERS[name].__name__})")
        cls.name = name
        DISTILLERS[name] = cls
        return cls

    return add


def distiller_names(teacher: bool | None = True) -> list[str]:
    """The registered method names: those that need a teacher (``teacher=True``: the values of
    ``kd.method``), those that do not (False), or all (None)."""
    return [n for n, c in DISTILLERS.items() if teacher is None or c.needs_teacher == teacher]


def unknown_method_message(name: str) -> str:
    return f"kd.method: unknown KD method {name!r}; choose one of {', '.join(distiller_names())}"


def make_distiller(method: str, student: torch.nn.Module, teacher: torch.nn.Module | None,
                   kd: KDConfig | None = None, *, channels_last: bool = False) -> Distiller:
    """The registered distiller ``method`` for ``student`` and ``teacher`` (None: ``alone``) with the
    hyperparameters of ``kd`` (defaults when None)."""
    if teacher is None:
        method = "alone"
    cls = DISTILLERS.get(method)
    if cls is None or not cls.needs_teacher and teacher is not None:
        raise MixkdError(unknown_method_message(method))
    distiller = cls(student, teacher, kd if kd is not None else KDConfig())
    distiller.modules.to(distiller.device)
    distiller.channels_last = channels_last
    return distiller


class Distiller:
    """The base of every KD method: see the module docstring for the contract.

    Subclasses set ``loss_names`` and ``needs_teacher`` and implement :meth:`forward_train`; the
    rest (parameters, train/eval, checkpoint state, the epoch tensor, channels-last input) is here.
    """

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    loss_names: ClassVar[tuple[str, ...]] = ("loss", "ce", "kd")

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module | None, kd: KDConfig):
        if self.needs_teacher and teacher is None:
            raise ValueError(f"the {self.name or type(self).__name__} distiller needs a teacher")
        if not self.needs_teacher and teacher is not None:
            raise ValueError(f"the {self.name or type(self).__name__} distiller takes no teacher")
        self.student, self.teacher, self.kd = student, teacher, kd
        self.channels_last = False  # bf16 runs feed the models channels-last images
        self.device = next(student.parameters()).device
        self.modules = torch.nn.ModuleDict()  # the method's own trainable modules
        self.epoch = torch.ones((), dtype=torch.float32, device=self.device)  # from 1; see set_epoch
        self.epochs = 1
        self._parallel: torch.nn.Module | None = None  # the DDP wrapper of a data-parallel run

    # ---- what a subclass writes -------------------------------------------------------------
    def forward_train(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ---- what the step, the engine and the checkpoints use ------------------------------------
    def losses(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named losses of one (mixed) batch (see :meth:`forward_train`)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._parallel is not None:
            return self._parallel(x, target)
        return self.forward_train(x, target)

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
        """The method's own trainable state (``{}`` for logit methods), saved in checkpoints."""
        return self.modules.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.modules.state_dict()
        if set(own) != set(state):
            raise MixkdError(f"the checkpoint's {self.name} state has {sorted(state) or 'nothing'} but the "
                             f"method needs {sorted(own) or 'nothing'}; was it written by another kd.method?")
        self.modules.load_state_dict(state)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a training step changes, besides the optimizer's (what a step that must leave
        no trace saves and restores): parameters and buffers of the student and the method's
        modules, and the teacher's buffers."""
        tensors = list(self.student.parameters()) + list(self.student.buffers())
        tensors += list(self.modules.parameters()) + list(self.modules.buffers())
        if self.teacher is not None:
            tensors += list(self.teacher.buffers())
        return tensors

    def with_models(self, student: torch.nn.Module, teacher: torch.nn.Module | None) -> Distiller:
        """A view of this distiller computing with other (compiled) student and teacher modules; it
        shares everything else (the method's modules, the epoch tensor, the hyperparameters)."""
        view = copy.copy(self)
        view.student, view.teacher = student, teacher
        return view


class _Trainable(torch.nn.Module):
    """The student and a distiller's own modules as one module whose forward is the distiller's
    :meth:`Distiller.forward_train` (what ``DistributedDataParallel`` wraps)."""

    def __init__(self, distiller: Distiller):
        super().__init__()
        self.student, self.extra = distiller.student, distiller.modules
        self._forward = distiller.forward_train

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._forward(x, target)


@register("alone")
class Supervised(Distiller):
    """The student trained alone (teachers, baselines): soft-target cross-entropy on the mixed labels."""

    needs_teacher = False
    loss_names = ("loss", "ce")

    def forward_train(self, x, target):
        return supervised_objective(self.student(x), target)


class _LogitKD(Distiller):
    """A method on the logits only: ``objective(student_logits, teacher_logits, target)``."""

    objective_method: ClassVar[str] = "kd"

    def __init__(self, student, teacher, kd: KDConfig):
        super().__init__(student, teacher, kd)
        self.objective = KDObjective(self.objective_method, kd.temperature, kd.ce_weight, kd.kd_weight)

    def forward_train(self, x, target):
        student_logits = self.student(x)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return self.objective(student_logits, teacher_logits, target)


@register("kd")
class HintonKD(_LogitKD):
    """Hinton KD: ``ce_weight * CE + kd_weight * T^2 KL`` at ``temperature`` (see :class:`KDObjective`)."""

    objective_method = "kd"


@register("std")
class StandardizedKD(_LogitKD):
    """Standardized KD: CE on standardized student logits + KL of standardized logits (no temperature)."""

    objective_method = "std"


class _Term(Distiller):
    """A logit method: ``ce_weight * CE(student, target) + weight * term``, the term one of
    :func:`mixkd.losses.distillation_loss` (``term``) with the run's resolved hyperparameters."""

    term: ClassVar[str] = ""

    def __init__(self, student, teacher, kd: KDConfig):
        super().__init__(student, teacher, kd)
        self.params = {k: kd.params()[k] for k in DISTILLATION_DEFAULTS[self.term]}

    def kd_factor(self) -> torch.Tensor | float:
        """What multiplies the term: ``kd_weight`` (a schedule may make it a device tensor)."""
        return self.kd.kd_weight

    def forward_train(self, x, target):
        student_logits = self.student(x)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        ce = soft_cross_entropy(student_logits, target)
        kd = distillation_loss(self.term, student_logits, teacher_logits, target, **self.params)
        return {"loss": self.kd.ce_weight * ce + self.kd_factor() * kd, "ce": ce, "kd": kd}


@register("dkd")
class DKD(_Term):
    """Decoupled KD (Zhao et al., CVPR 2022; mdistiller ``distillers/DKD.py``): ``ce_weight * CE +
    min(epoch / warmup_epochs, 1) * kd_weight * T^2 (alpha TCKD + beta NCKD)``, the epoch counted from 1.
    On a mixed sample, the label-weighted sum of DKD over the sample's classes
    (:func:`mixkd.losses.dkd_loss`)."""

    term = "dkd"

    def kd_factor(self):
        warmup = self.kd.warmup_epochs
        if not warmup:
            return self.kd.kd_weight
        return self.kd.kd_weight * torch.clamp(self.epoch / warmup, max=1.0)  # a device op: no host sync


@register("lskd")
class LogitStandardizedKD(_Term):
    """KD with logit standardization (Sun et al., CVPR 2024): Hinton KD on z-scored logits at a base
    temperature, times T^2; CE on the raw student logits (unlike the study's ``std``)."""

    term = "lskd"


@register("dist")
class DIST(_Term):
    """DIST (Huang et al., NeurIPS 2022): T^2 (beta * inter-class + gamma * intra-class relation),
    each 1 - Pearson correlation of softmax(z / T) across classes / across the batch."""

    term = "dist"


class ConvRegressor(torch.nn.Module):
    """FitNet's regressor from a student feature map to the teacher's (RepDistiller ``models/util.py``
    ``ConvReg``): a 1x1 convolution when the maps have one size (a 3x3 stride-2 one when the student's is
    twice the teacher's, a 4x4 stride-2 transposed one when half, a (1 + dH) x (1 + dW) one when larger
    otherwise), then batch norm and ReLU."""

    def __init__(self, s_shape: torch.Size, t_shape: torch.Size):
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape[1:], t_shape[1:]
        if s_h == 2 * t_h:
            self.conv = torch.nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = torch.nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = torch.nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise MixkdError(f"fitnet: no regressor from a {s_h}x{s_w} student feature map to a {t_h}x{t_w} "
                             "teacher one; choose another kd.hint_layer")
        self.bn = torch.nn.BatchNorm2d(t_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


@register("fitnet")
class FitNet(Distiller):
    """FitNet (Romero et al., ICLR 2015) as RepDistiller trains it (``--distill hint``): ``ce_weight * CE
    + kd_weight * Hinton KD + hint_weight * MSE(regressor(student feature), teacher feature)`` on the
    ``hint_layer``-th feature map (``is_feat`` features; 2: the middle stage), both from the same mixed
    batch. The regressor (:class:`ConvRegressor`) is the method's trainable module: in the optimizer,
    the checkpoints and the captured step. Its shape is found by one forward of both models on a
    32 x 32 batch (the CIFAR size; a 1x1 or stride-2 regressor then serves any size)."""

    loss_names = ("loss", "ce", "kd", "hint")
    PROBE_SIZE = 32

    def __init__(self, student, teacher, kd: KDConfig):
        super().__init__(student, teacher, kd)
        stages = str(kd.hint_layer).split(",")  # one stage for both, or "student_stage,teacher_stage"
        self.layers = (feature_index(student, stages[0].strip()), feature_index(teacher, stages[-1].strip()))
        s_shape, t_shape = self._feature_shapes()
        self.modules["regressor"] = ConvRegressor(s_shape, t_shape).to(self.device)

    def _feature_shapes(self) -> tuple[torch.Size, torch.Size]:
        size = getattr(self.student, "mixkd_input_size", None) or self.PROBE_SIZE  # the size it trains at
        probe = torch.zeros(2, 3, size, size, device=self.device)
        shapes = []
        for model, layer in zip((self.student, self.teacher), self.layers):
            was_training = model.training
            model.eval()
            with torch.no_grad():
                feats, _ = model(probe, is_feat=True)
            model.train(was_training)
            if not -len(feats) <= layer < len(feats) or feats[layer].dim() != 4:
                maps = [i for i, f in enumerate(feats) if f.dim() == 4]
                names = feature_names(model)
                maps = [f"{i} ({names[i]})" for i in maps] if names else maps
                raise MixkdError(f"fitnet: kd.hint_layer {layer} is not a feature map of "
                                 f"{getattr(model, 'mixkd_name', type(model).__name__)}; choose one of {maps}")
            shapes.append(feats[layer].shape)
        return shapes[0], shapes[1]

    def forward_train(self, x, target):
        feats_s, student_logits = self.student(x, is_feat=True)
        with torch.no_grad():
            feats_t, teacher_logits = self.teacher(x, is_feat=True)
        s_layer, t_layer = self.layers
        hint = F.mse_loss(self.modules["regressor"](feats_s[s_layer]).float(), feats_t[t_layer].float())
        ce = soft_cross_entropy(student_logits, target)
        kd = kd_loss(student_logits, teacher_logits, self.kd.temperature)
        loss = self.kd.ce_weight * ce + self.kd.kd_weight * kd + self.kd.hint_weight * hint
        return {"loss": loss, "ce": ce, "kd": kd, "hint": hint}
