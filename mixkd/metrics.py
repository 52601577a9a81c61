"""Accuracy and loss metrics, accumulated on the device and read back once."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mixkd import distributed

NLL_SCALE = 2.0**32  # NLL summed as integer multiples of 2^-32: exact sums, whatever their order


def batch_counts(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summed (not averaged) top-1 / top-5 hits and NLL of a batch, as int64 device tensors; the NLL
    in units of 2^-32 (each sample's rounded, an error below 1e-10), so that the totals are exact
    integer sums whatever the batches and however they are split over ranks: a data-parallel run
    reports what one process computes on the same weights, to the last bit."""
    logits = logits.float()
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    hits = topk == labels[:, None]
    nll = F.cross_entropy(logits, labels, reduction="none").double()
    return {
        "top1": hits[:, 0].sum(),
        "top5": hits.any(dim=1).sum(),
        "nll": (nll * NLL_SCALE).round().long().sum(),
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
    packed = torch.stack([totals[k] if k in totals else torch.zeros((), dtype=torch.int64, device=device)
                          for k in keys] + [torch.tensor(n, dtype=torch.int64, device=device)])
    if getattr(loader, "world", 1) > 1:
        distributed.all_reduce(packed)  # integers: exact
    *values, n = packed.cpu().tolist()
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "nll": float("nan")}
    out = dict(zip(keys, values))
    return {"top1": 100.0 * out["top1"] / n, "top5": 100.0 * out["top5"] / n, "nll": out["nll"] / NLL_SCALE / n}
