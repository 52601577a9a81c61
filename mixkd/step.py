"""The training step, eager or captured as one CUDA graph.

One step: one-hot labels -> mixing -> teacher forward (no grad) -> student forward -> losses ->
backward -> SGD update, with the losses summed on the device. Nothing in it reads a value back to
the host, so a whole epoch runs without synchronization; :meth:`TrainStep.epoch_means` reads the
sums once. On CUDA, :class:`GraphedTrainStep` records the step once and replays it, which removes the
per-kernel launch cost that bounds a batch-64 step on a large GPU.
"""

from __future__ import annotations

import contextlib

import torch

from mixkd.mix import MixSpec, mix_batch

LOSS_KEYS = ("loss", "ce", "kd")


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
        if self.weight_decay:
            grads = torch._foreach_add(grads, self.params, alpha=self.weight_decay)
        if self.momentum:
            torch._foreach_mul_(self.buffers, self.momentum)
            torch._foreach_add_(self.buffers, grads)
            grads = self.buffers
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


class TrainStep:
    """The eager step. ``precision='bf16'`` runs the forward passes under bf16 autocast (losses in fp32)."""

    def __init__(self, learner, optimizer: SGD, mix: MixSpec, num_classes: int, generator: torch.Generator,
                 precision: str = "fp32"):
        self.learner, self.optimizer, self.mix = learner, optimizer, mix
        self.num_classes, self.generator, self.precision = num_classes, generator, precision
        self.device = optimizer.params[0].device
        self.sums = torch.zeros(len(LOSS_KEYS), device=self.device)  # sums of per-batch mean losses
        self.steps = 0

    def autocast(self, cache_enabled: bool = True):
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        target = one_hot(y, self.num_classes)
        x, target = mix_batch(x, target, self.mix, self.generator)
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        with self.autocast(cache_enabled=not capturing):
            losses = self.learner.losses(x, target)
        losses["loss"].backward()
        self.optimizer.step()
        zero = losses["loss"].new_zeros(())
        self.sums += torch.stack([losses.get(k, zero).detach().float() for k in LOSS_KEYS])

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        self._step(x, y)
        self.steps += 1

    def epoch_means(self) -> dict[str, float]:
        """Mean losses over the steps since the last call (one device read), then reset."""
        values = (self.sums / max(self.steps, 1)).tolist()
        self.sums.zero_()
        self.steps = 0
        keys = LOSS_KEYS if self.learner.teacher is not None else ("loss", "ce")
        return {k: v for k, v in zip(LOSS_KEYS, values) if k in keys}


class GraphedTrainStep(TrainStep):
    """The same step recorded once as a CUDA graph and replayed for every batch of a fixed size.

    Warm-up steps (needed before capture) run on copies of the state, so training starts from exactly
    the weights, buffers and RNG state the eager step would have used.
    """

    WARMUP_STEPS = 3

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x: torch.Tensor | None = None
        self.static_y: torch.Tensor | None = None

    def _state_tensors(self) -> list[torch.Tensor]:
        tensors = list(self.learner.student.parameters()) + list(self.learner.student.buffers())
        return tensors + self.optimizer.buffers + [self.sums]

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.static_x, self.static_y = x.clone(), y.clone()
        saved = [t.detach().clone() for t in self._state_tensors()]
        rng = self.generator.get_state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_STEPS):
                self.optimizer.zero_grad()
                self._step(self.static_x, self.static_y)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for t, s in zip(self._state_tensors(), saved):
                t.copy_(s)
        self.generator.set_state(rng)
        self.graph = torch.cuda.CUDAGraph()
        self.graph.register_generator_state(self.generator)
        self.optimizer.zero_grad()
        with torch.cuda.graph(self.graph):
            self._step(self.static_x, self.static_y)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.graph is None:
            self._capture(x, y)
        self.static_x.copy_(x, non_blocking=True)
        self.static_y.copy_(y, non_blocking=True)
        self.graph.replay()
        self.steps += 1
