"""Accuracy and loss metrics, accumulated on the device and read back once."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mixkd import distributed


def batch_counts(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summed (not averaged) top-1 / top-5 hits and NLL of a batch, as device tensors."""
    logits = logits.float()
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    hits = topk == labels[:, None]
    return {
        "top1": hits[:, 0].sum().float(),
        "top5": hits.any(dim=1).sum().float(),
        "nll": F.cross_entropy(logits, labels, reduction="sum"),
    }


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, precision: str = "fp32",
             stop: Callable[[], bool] | None = None) -> dict[str, float] | None:
    """Top-1 and top-5 accuracy (%) and mean NLL of ``model`` over ``loader``; None where ``stop()``
    said, before a batch, that a stop is due (a signal: an evaluation of 50,000 images may outlast a
    scheduler's grace period).

    A loader that yields one rank's part of the data (``loader.world > 1``, see
    :func:`mixkd.data.make_test_loader`) is summed over the ranks: every rank gets the metrics of the
    whole split (a collective: every rank calls it, to the end: ``stop`` is not asked)."""
    was_training = model.training
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    n = 0
    if getattr(loader, "world", 1) > 1:
        stop = None
    for x, y in loader:
        if stop is not None and stop():
            model.train(was_training)
            return None
        if precision == "bf16":
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                logits = model(x.contiguous(memory_format=torch.channels_last))
        else:
            logits = model(x)
        counts = batch_counts(logits, y)
        for key, value in counts.items():
            totals[key] = totals[key] + value if key in totals else value
        n += y.shape[0]
    model.train(was_training)
    keys = ["top1", "top5", "nll"]
    device = next(iter(totals.values())).device if totals else torch.device("cpu")
    packed = torch.stack([totals[k].double() if k in totals else torch.zeros((), dtype=torch.float64, device=device)
                          for k in keys] + [torch.tensor(float(n), dtype=torch.float64, device=device)])
    if getattr(loader, "world", 1) > 1:
        distributed.all_reduce(packed)
    *values, n = packed.cpu().tolist()
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "nll": float("nan")}
    out = dict(zip(keys, values))
    return {"top1": 100.0 * out["top1"] / n, "top5": 100.0 * out["top5"] / n, "nll": out["nll"] / n}
