"""Accuracy and loss metrics, accumulated on the device and read back once."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
def evaluate(model: torch.nn.Module, loader, precision: str = "fp32") -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) and mean NLL of ``model`` over ``loader``."""
    was_training = model.training
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    n = 0
    for x, y in loader:
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
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "nll": float("nan")}
    keys = list(totals)
    values = torch.stack([totals[k] for k in keys]).cpu().tolist()
    out = dict(zip(keys, values))
    return {"top1": 100.0 * out["top1"] / n, "top5": 100.0 * out["top5"] / n, "nll": out["nll"] / n}
