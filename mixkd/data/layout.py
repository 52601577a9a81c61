"""What one training batch holds: the one owner of a batch's layout, from the loaders to the step.

A loader yields ``(x, y)`` pairs, whatever the run needs; the layout says how to read them:

* ``x``: the student's images ``(B, C, H, W)``, or, when the batch holds more than one view of each
  sample, the views stacked ``(V, B, C, H, W)`` in the order of :attr:`BatchLayout.views`:
  ``student`` first, then ``teacher`` (a ``teacher_view`` other than ``same``: the teacher's own
  view), then ``strong`` (a second, strong view of each sample that both models see, for methods
  that take one, as MLKD does);
* ``y``: the labels ``(B,)``, or, when the method reads the samples' dataset indices (CRD's
  per-sample memory), labels and indices stacked ``(2, B)``.

Keeping a batch two tensors keeps everything that moves batches (the CUDA-graphed step's static
inputs, packs, the data-parallel wrapper, checkpoints of the step) unchanged by what a batch holds.
What a method reads besides the images and labels is named by its ``inputs`` (``index``,
``strong``: :data:`METHOD_INPUTS`); the step hands them to it as keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# What the teacher sees (issue 28): same: the student's batch; independent: its own draw of the
# per-sample policies (and of the mixing, in the step); clean: the un-augmented image.
TEACHER_VIEWS = ("same", "independent", "clean")
# What a KD method may read besides the (mixed) images and labels (``Distiller.inputs``).
METHOD_INPUTS = ("index", "strong")


@dataclass(frozen=True)
class Batch:
    """One batch read through its layout: ``x`` the student's view, ``y`` the labels, and what else it holds."""

    x: torch.Tensor
    y: torch.Tensor
    teacher: torch.Tensor | None = None
    strong: torch.Tensor | None = None
    index: torch.Tensor | None = None


@dataclass(frozen=True)
class BatchLayout:
    """The views and the per-sample data one training batch holds (see the module's docstring)."""

    teacher_view: str = "same"
    strong: bool = False
    index: bool = False

    def __post_init__(self) -> None:
        if self.teacher_view not in TEACHER_VIEWS:
            raise ValueError(f"teacher_view must be one of {TEACHER_VIEWS}, got {self.teacher_view!r}")
        if self.strong and self.teacher_view != "same":
            raise ValueError("a strong view is seen by both models: it needs teacher_view same")

    @classmethod
    def for_method(cls, inputs: tuple[str, ...] = (), teacher_view: str = "same") -> BatchLayout:
        """The layout a method reading ``inputs`` (a subset of :data:`METHOD_INPUTS`) needs."""
        unknown = sorted(set(inputs) - set(METHOD_INPUTS))
        if unknown:
            raise ValueError(f"unknown method inputs {unknown}: a method may read {list(METHOD_INPUTS)}")
        return cls(teacher_view=teacher_view, strong="strong" in inputs, index="index" in inputs)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The method inputs (:data:`METHOD_INPUTS`) this layout's batches hold."""
        return tuple(k for k in METHOD_INPUTS if getattr(self, k))

    @property
    def views(self) -> tuple[str, ...]:
        """The views of each sample, in the order ``x`` stacks them."""
        return ("student",) + (("teacher",) if self.teacher_view != "same" else ()) + (("strong",) if self.strong else ())

    def pack(self, x: torch.Tensor, labels: torch.Tensor, *, teacher: torch.Tensor | None = None,
             strong: torch.Tensor | None = None, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(x, y)`` pair a loader yields for these parts (each checked against the layout)."""
        parts = {"teacher": teacher, "strong": strong}
        for name, part in parts.items():
            if (part is not None) != (name in self.views):
                raise ValueError(f"the batch layout {self.views} {'has' if name in self.views else 'has no'} a {name} view")
        if (index is not None) != self.index:
            raise ValueError(f"the batch layout {'holds' if self.index else 'holds no'} sample indices")
        if len(self.views) > 1:
            x = torch.stack([x] + [parts[v] for v in self.views[1:]])
        if self.index:
            labels = torch.stack([labels.to(torch.int64), index.to(device=labels.device, dtype=torch.int64)])
        return x, labels

    def unpack(self, x: torch.Tensor, y: torch.Tensor) -> Batch:
        """The parts of a pair :meth:`pack` made."""
        views = self.views
        if (x.dim() == 5) != (len(views) > 1) or (len(views) > 1 and x.shape[0] != len(views)):
            raise ValueError(f"a batch of layout {views} has {'(V, B, C, H, W)' if len(views) > 1 else '(B, C, H, W)'} "
                             f"images, got shape {tuple(x.shape)}")
        if (y.dim() == 2) != self.index:
            raise ValueError(f"a batch {'with' if self.index else 'without'} sample indices has labels of shape "
                             f"{'(2, B)' if self.index else '(B,)'}, got {tuple(y.shape)}")
        named = dict(zip(views, x)) if len(views) > 1 else {"student": x}
        labels, index = (y[0], y[1]) if self.index else (y, None)
        return Batch(named["student"], labels, named.get("teacher"), named.get("strong"), index)
