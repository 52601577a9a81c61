"""The training step, eager or captured as one CUDA graph, optionally compiled.

One step: one-hot labels -> mixing -> the distiller's losses (:mod:`mixkd.distiller`: teacher
forward without grad, student forward, named losses) -> backward -> SGD update, with the losses summed on the device. Nothing in it reads a value back to
the host, so a whole epoch runs without synchronization; :meth:`TrainStep.epoch_means` reads the
sums once. On CUDA, :class:`GraphedTrainStep` records the step once and replays it, which removes the
per-kernel launch cost that bounds a batch-64 step on a large GPU.

With ``compile=True`` the teacher and the student are compiled with ``torch.compile`` (inductor,
``dynamic=False``) for this step only (evaluation keeps the plain modules); inside the CUDA graph the
fused kernels replace many small ones. Compilation happens in the first step (for the graphed step:
in its warm-up, before capture). Runs of the same architectures in one process share the compiled
code (dynamo caches per code object, and parameters are graph inputs), and the recompile limit is
raised so that a pack of runs never falls back to eager; :func:`set_compile_cache` puts inductor's
on-disk cache where every process of a study finds it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mixkd import distributed
from mixkd.augment.base import BatchPolicy
from mixkd.data.layout import BatchLayout
from mixkd.distiller import Distiller
from mixkd.errors import MixkdError
from mixkd.files import make_dir
from mixkd.mix import MixSpec, mix_batch


class _TeacherInput(torch.nn.Module):
    """The teacher, reading the batch of its own view (:attr:`x`, set by the step before the losses)
    instead of the one the KD method hands it: every method gets ``teacher_view`` without a change."""

    def __init__(self, teacher: torch.nn.Module):
        super().__init__()
        self.teacher = teacher
        self.x: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, *args, **kwargs):
        view = self.x.to(memory_format=torch.channels_last) if x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous() else self.x
        return self.teacher(view, *args, **kwargs)

COMPILE_SETTINGS = ("auto", "on", "off")
COMPILE_SCOPES = ("models", "step")
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")  # inductor's own CUDA graphs would nest in ours
# Compiled variants kept per code object (each architecture x train/eval x precision x batch size is one);
# far above what a process of a study meets, so a pack never falls back to eager.
RECOMPILE_LIMIT = 1024


class SGD:
    """SGD with momentum and weight decay: ``torch.optim.SGD``'s update (dampening 0, no Nesterov).

    The learning rate lives in a device tensor, so a captured graph follows :meth:`set_lr`.
    ``state_dict`` has ``torch.optim.SGD``'s layout.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4):
        self.params = [p for p in params if p.requires_grad]
        self.momentum, self.weight_decay = momentum, weight_decay
        self.lr = torch.tensor(lr, dtype=torch.float32, device=self.params[0].device)
        self.buffers = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    def set_lr(self, lr: float) -> None:
        self.lr.fill_(lr)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if self.weight_decay:  # in place: the step owns the gradients (zero_grad drops them)
            torch._foreach_add_(grads, self.params, alpha=self.weight_decay)
        if self.momentum:
            torch._foreach_mul_(self.buffers, self.momentum)
            torch._foreach_add_(self.buffers, grads)
            grads = self.buffers
        if self.lr.device.type == "cpu":
            # no graph to capture: the rate as a number, and no temporary copy of the model (on the CPU
            # each allocating foreach op costs what a ResNet-18 step's tenth does; BENCHMARKS.md, issue 29)
            torch._foreach_add_(self.params, grads, alpha=-self.lr.item())
        else:
            torch._foreach_sub_(self.params, torch._foreach_mul(grads, self.lr))

    def state_dict(self) -> dict:
        return {
            "state": {i: {"momentum_buffer": b} for i, b in enumerate(self.buffers)},
            "param_groups": [{"lr": float(self.lr), "momentum": self.momentum, "weight_decay": self.weight_decay,
                              "dampening": 0, "nesterov": False, "params": list(range(len(self.params)))}],
        }

    def load_state_dict(self, state: dict) -> None:
        for i, buf in enumerate(self.buffers):
            saved = state["state"].get(i, state["state"].get(str(i), {})).get("momentum_buffer")
            if saved is not None:
                buf.copy_(saved)
        self.set_lr(float(state["param_groups"][0]["lr"]))


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float one-hot rows; unlike ``F.one_hot`` it never checks values on the host."""
    return torch.zeros(labels.shape[0], num_classes, device=labels.device).scatter_(1, labels[:, None], 1.0)


# ---- compilation ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompileSpec:
    """What ``torch.compile`` (inductor, ``dynamic=False``) covers in the step.

    ``scope='models'``: the teacher and the student (the default, and what ``compile: on`` means).
    ``scope='step'``: also the one-hot labels, the mixing and the losses, as one compiled function
    (the mixing's draws from the run's generator stay eager, between compiled pieces).
    ``mode``: inductor's mode; None is its default.
    """

    scope: str = "models"
    mode: str | None = None

    def __post_init__(self) -> None:
        if self.scope not in COMPILE_SCOPES:
            raise ValueError(f"compile scope must be one of {COMPILE_SCOPES}, got {self.scope!r}")
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {self.mode!r}")

    def options(self) -> dict:
        return {"backend": "inductor", "dynamic": False, "mode": None if self.mode == "default" else self.mode}


def resolve_compile(setting: str, device_type: str, dataset: str) -> bool:
    """The run config's ``compile: auto|on|off`` for a run on ``device_type`` ('cuda', 'cpu') and ``dataset``.

    ``auto`` compiles CUDA runs of the device-resident (array) datasets, whose graphed step gained
    24-37% on an H100 (BENCHMARKS.md); not CPU runs (compilation costs more than it saves there) nor
    image-folder runs (bound by data loading, with a variable last batch).
    """
    if setting not in COMPILE_SETTINGS:
        raise MixkdError(f"compile must be one of {', '.join(COMPILE_SETTINGS)}, got {setting!r}")
    if setting == "auto":
        return device_type == "cuda" and dataset != "imagefolder"
    return setting == "on"


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise dynamo's per-code recompile limit to ``limit`` (never lower it), and make hitting it an error.

    Every architecture of one class (all CIFAR ResNets, say) shares one ``forward`` code object, and
    each (architecture, train/eval, precision, batch size) it meets is one compiled variant of it.
    Past dynamo's default of 8 it would silently run the rest eagerly; a pack meeting many
    architectures must not, and if the raised limit is ever hit, the run fails loudly instead.
    """
    cfg = torch._dynamo.config
    for names, value in ((("recompile_limit", "cache_size_limit"), limit),
                         (("accumulated_recompile_limit", "accumulated_cache_size_limit"), 16 * limit)):
        name = _dynamo_option(cfg, names)
        setattr(cfg, name, max(getattr(cfg, name), value))
    # Only a guard: a torch without it (before 2.5) falls back to eager past the limit, as it always did.
    name = next((n for n in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit") if hasattr(cfg, n)), None)
    if name is not None:
        setattr(cfg, name, True)


def _dynamo_option(cfg, names: tuple[str, ...]) -> str:
    """The first of ``names`` (today's name, then the older one) that dynamo's config has."""
    name = next((n for n in names if hasattr(cfg, n)), None)
    if name is None:
        raise MixkdError(f"torch {torch.__version__}: torch._dynamo.config has no {' or '.join(names)}, which "
                         "compile needs; install a torch mixkd supports (2.4 to 2.14) or set compile: off")
    return name


def set_compile_cache(directory: str | os.PathLike) -> Path:
    """Keep inductor's on-disk cache (compiled kernels, FX and autograd graphs) in ``directory``.

    Sets ``TORCHINDUCTOR_CACHE_DIR`` for this process and the processes it starts, so every process of
    a study (``<study folder>/.compile-cache``) reuses what the first one compiled. Call it before the
    first compilation. Returns the absolute directory.
    """
    path = make_dir(Path(directory).absolute())
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


# ---- the step ---------------------------------------------------------------------------------------
class TrainStep:
    """The eager step. ``precision='bf16'`` runs the forward passes under bf16 autocast (losses in fp32).

    ``compile``: True (or a :class:`CompileSpec`) compiles the teacher and student for this step.
    """

    graph_owns_grads = False

    def __init__(self, distiller: Distiller, optimizer: SGD, mix: MixSpec, num_classes: int, generator: torch.Generator,
                 precision: str = "fp32", compile: bool | CompileSpec | None = None, layout: BatchLayout | None = None,
                 pick: BatchPolicy | None = None):
        self.distiller, self.optimizer, self.mix = distiller, optimizer, mix
        self.num_classes, self.generator, self.precision = num_classes, generator, precision
        self.layout = layout or BatchLayout.for_method(distiller.inputs)
        teacher_view = self.teacher_view = self.layout.teacher_view
        self.pick = pick
        missing = sorted(set(distiller.inputs) - set(self.layout.inputs))
        if missing:
            raise ValueError(f"the {distiller.name} method reads {missing}: the batch layout must hold them")
        if pick is not None and (mix.active or self.layout != BatchLayout()):
            raise ValueError("cutmix_pick is the batch stage itself: no other mixing, teacher_view same, "
                             "and a method that reads nothing but the images and labels")
        self.device = optimizer.params[0].device
        self.loss_names = distiller.loss_names + (("pick_kd",) if pick is not None else ())
        self.sums = torch.zeros(len(self.loss_names), device=self.device)  # sums of per-batch mean losses
        self.steps = 0
        self.compile_spec = CompileSpec() if compile is True else (compile or None)
        self._compute = distiller  # what computes the losses: the distiller, or a view of it with compiled models
        self._forward = self._mixed_losses
        self._warm = self.compile_spec is None  # False until the first step has compiled
        if self.compile_spec is not None:
            allow_recompiles()
            opts = self.compile_spec.options()
            if self.compile_spec.scope == "models":
                teacher = None if distiller.teacher is None else torch.compile(distiller.teacher, **opts)
                self._compute = distiller.with_models(torch.compile(distiller.student, **opts), teacher)
            else:
                self._forward = torch.compile(self._mixed_losses, **opts)
        self._teacher_input: _TeacherInput | None = None
        if teacher_view != "same" and distiller.teacher is not None:  # the teacher reads its own batch
            self._teacher_input = _TeacherInput(self._compute.teacher)
            self._compute = self._compute.with_models(self._compute.student, self._teacher_input)

    @property
    def compiled(self) -> bool:
        return self.compile_spec is not None

    @property
    def warm(self) -> bool:
        """Whether the first step, which compiles (and, graphed, captures), has run."""
        return self._warm

    def autocast(self, cache_enabled: bool = True):
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)

    def _mixed_losses(self, x: torch.Tensor, y: torch.Tensor, cache_enabled: bool) -> dict[str, torch.Tensor]:
        batch = self.layout.unpack(x, y)  # (mixkd.data.layout: the views and indices a batch holds)
        x, target = batch.x, one_hot(batch.y, self.num_classes)
        if self.pick is not None:
            return self._picked_losses(x, target, cache_enabled)
        clean_target = target
        rank, world = distributed.rank(), distributed.world()
        inputs: dict[str, torch.Tensor] = {}
        if batch.strong is not None:  # both views mixed alike: same partners, weights and boxes
            channels = x.shape[1]
            both, target = mix_batch(torch.cat([x, batch.strong], dim=1), target, self.mix, self.generator, rank, world)
            x, inputs["strong"] = both[:, :channels], both[:, channels:]
        else:
            x, target = mix_batch(x, target, self.mix, self.generator, rank, world)
        if batch.index is not None:  # a mixed image's index is that of the sample it was mixed into
            inputs["index"] = batch.index
        if self._teacher_input is not None:
            x_teacher = batch.teacher
            if self.teacher_view == "independent":  # its own draw of the mixing too
                x_teacher, _ = mix_batch(x_teacher, clean_target, self.mix, self.generator, rank, world)
            self._teacher_input.x = x_teacher
        with self.autocast(cache_enabled=cache_enabled):
            return self._compute.losses(x, target, **inputs)

    def _picked_losses(self, x: torch.Tensor, target: torch.Tensor, cache_enabled: bool) -> dict[str, torch.Tensor]:
        """CutMixPick (mixkd/augment/cutmix_pick.py): the method's losses on the clean batch plus the
        picked CutMix candidates' KD term; the pick is a top-k on the device."""
        pick, compute = self.pick, self._compute
        pool, _ = pick.candidates(x, target, self.generator)
        with self.autocast(cache_enabled=cache_enabled):
            losses = compute.losses(x, target)
            with torch.no_grad():
                teacher_pool = compute.teacher(pool).float()
                student_pool = None
                if pick.settings.criterion != "teacher_entropy":  # in train mode, as Good-DA-in-KD scores
                    student_pool = compute.student(pool).float()
            idx = pick.pick(pool, teacher_pool, student_pool, x.shape[0])
            student_picked = compute.student(pool.index_select(0, idx)).float()
        picked = pick.picked_kd(teacher_pool.index_select(0, idx), student_picked)
        factor = compute.kd_factor() if hasattr(compute, "kd_factor") else getattr(compute.settings, "kd_weight", 1.0)
        weight = pick.settings.weight * factor
        return {**losses, "loss": losses["loss"] + weight * picked, "pick_kd": picked}

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # autocast's weight cache must be off while capturing; compiled code is specialized on that
        # setting, so a compiled step keeps it off throughout (else the capture would compile again)
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        losses = self._forward(x, y, not (capturing or self.compiled))
        losses["loss"].backward()
        self.optimizer.step()
        self.sums += torch.stack([losses[k].detach().float() for k in self.loss_names])

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        self._step(x, y)
        self.steps += 1
        self._warm = True

    def global_sums(self) -> torch.Tensor:
        """The loss sums of the global batch: in a data-parallel run, each rank's sums of its part's
        mean losses, averaged over the ranks (equal parts); else :attr:`sums` itself (a copy)."""
        sums = self.sums.clone()
        if distributed.active():
            distributed.all_reduce(sums).div_(distributed.world())
        return sums

    def epoch_means(self) -> dict[str, float]:
        """Mean losses over the steps since the last call (one device read), then reset. In a
        data-parallel run: the means of the global batch's losses (a collective: every rank calls it)."""
        values = (self.global_sums() / max(self.steps, 1)).tolist()
        self.sums.zero_()
        self.steps = 0
        return dict(zip(self.loss_names, values, strict=True))

    # ---- state that a step changes ------------------------------------------------------------
    def _state_tensors(self) -> list[torch.Tensor]:
        return self.distiller.state_tensors() + self.optimizer.buffers + [self.sums]

    def _snapshot(self) -> Callable[[], None]:
        """Save everything a step changes; the returned function puts it back exactly."""
        tensors = self._state_tensors()
        saved = [t.detach().clone() for t in tensors]
        grads = [p.grad for p in self.optimizer.params]
        steps, mix_rng, cpu_rng = self.steps, self.generator.get_state(), torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

        def restore() -> None:
            with torch.no_grad():
                for t, s in zip(tensors, saved):
                    t.copy_(s)
            if not self.graph_owns_grads:
                for p, g in zip(self.optimizer.params, grads):
                    p.grad = g
            self.steps = steps
            self.generator.set_state(mix_rng)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, self.device)

        return restore

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Seconds one step on this batch takes, leaving the run exactly as it was.

        A first, untimed step compiles (and, graphed, captures) if that has not happened yet; then
        one step is timed. Everything the steps change (weights, buffers, optimizer momentum, loss
        sums, step count, the mixing generator's and torch's RNG states) is restored, so training
        goes on bit-exactly as if ``measure`` had not run. The warm-up time is not in the result
        (time the call to see it).
        """
        restore = self._snapshot()
        try:
            if not self._warm:
                self(x, y)
                self._sync()
            t0 = time.perf_counter()
            self(x, y)
            self._sync()
            return time.perf_counter() - t0
        finally:
            restore()


class GraphedTrainStep(TrainStep):
    """The same step recorded once as a CUDA graph and replayed for every batch of a fixed size.

    Warm-up steps (needed before capture, and where compilation happens) run on copies of the state,
    so training starts from exactly the weights, buffers and RNG state the eager step would have used.
    """

    WARMUP_STEPS = 3
    graph_owns_grads = True  # the captured backward writes them; nothing reads p.grad outside the graph

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x: torch.Tensor | None = None
        self.static_y: torch.Tensor | None = None
        self._warm = False

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.static_x, self.static_y = x.clone(), y.clone()
        restore = self._snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_STEPS):
                self.optimizer.zero_grad()
                self._step(self.static_x, self.static_y)
        torch.cuda.current_stream().wait_stream(side)
        restore()
        self.graph = torch.cuda.CUDAGraph()
        self.graph.register_generator_state(self.generator)
        self.optimizer.zero_grad()
        with torch.cuda.graph(self.graph):
            self._step(self.static_x, self.static_y)

    def _snapshot(self) -> Callable[[], None]:
        restore = super()._snapshot()
        statics = [t.clone() for t in (self.static_x, self.static_y) if t is not None]

        def restore_all() -> None:
            restore()
            for t, s in zip((self.static_x, self.static_y), statics):
                t.copy_(s)

        return restore_all

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.graph is None:
            self._capture(x, y)
        self.static_x.copy_(x, non_blocking=True)
        self.static_y.copy_(y, non_blocking=True)
        self.graph.replay()
        self.steps += 1
        self._warm = True
