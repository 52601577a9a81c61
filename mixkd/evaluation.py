"""``mixkd eval``: the test-set accuracy of a checkpoint, with the data its run was trained on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mixkd.config import resolve_precision
from mixkd.data import load_dataset, make_test_loader
from mixkd.device import resolve_device
from mixkd.errors import MixkdError
from mixkd.header import checkpoint_header
from mixkd.loading import load_for_eval
from mixkd.metrics import evaluate
from mixkd.run_folder import CHECKPOINT_NAME, RunFolder


def eval_precision(asked: str | None, run_precision: str | None, device_type: str) -> tuple[str, str]:
    """The precision ``mixkd eval`` evaluates in, and why: ``asked`` (auto, fp32, bf16) where given;
    else the run's own (``run_precision``: what its ``result.json`` or ``config.yaml`` says, ``auto``
    resolved for ``device_type``), so that a run's figures are reproduced (a CUDA run evaluates under
    bf16 autocast by default); else fp32 (a checkpoint without its run)."""
    if asked is not None:
        return resolve_precision(asked, device_type), "asked"
    if run_precision is not None:
        return resolve_precision(run_precision, device_type), "the run's precision"
    return "fp32", "default"


def evaluate_checkpoint(checkpoint: str, dataset: str | None = None, data_dir: str | None = None,
                        model: str | None = None, device: str = "auto", download: bool = False,
                        batch_size: int | None = None, image_size: int | None = None,
                        workers: int | None = None, precision: str | None = None) -> dict[str, Any]:
    """Test-set top-1/top-5/NLL of a mixkd checkpoint (or run directory) or a RepDistiller ``.pth``.

    Unset ``dataset``, ``data_dir``, ``image_size`` and ``batch_size`` come from the run's
    ``config.yaml`` (a run directory, or its checkpoint file), else from the checkpoint's metadata,
    else cifar100 in ./data at batch 1024. ``precision``: see :func:`eval_precision` (the run's own
    where it has one); the result says which (``precision``, ``precision_from``). Only the test split
    is loaded. A ``timm:``/``tv:`` model with a library's weights is evaluated with its own preprocessing
    (:func:`mixkd.loading.load_for_eval`: on an image folder its own eval transform, crop included, where
    it differs from the dataset's); ``preprocessing`` then says which."""
    p = Path(checkpoint)
    run_dir = p if p.is_dir() else p.parent if p.name == CHECKPOINT_NAME else None
    folder = RunFolder(run_dir) if run_dir else None
    cfg = folder.read_config() if folder and folder.config.is_file() else None
    run_precision = None
    if cfg is not None:
        result = folder.read_result()
        run_precision = result.get("precision") if isinstance(result, dict) and isinstance(result.get("precision"), str) \
            else cfg.precision
        batch_size = batch_size or cfg.eval_batch_size
    if cfg is not None and dataset in (None, cfg.dataset):
        dataset, data_dir = cfg.dataset, data_dir or cfg.data_dir
        image_size = image_size or cfg.image_size
    if dataset is None:
        ckpt_file = p / CHECKPOINT_NAME if p.is_dir() else p
        try:
            meta = checkpoint_header(ckpt_file) if ckpt_file.is_file() else {}
        except MixkdError:
            meta = {}  # load_model says what is wrong with it
        dataset = meta.get("dataset") if isinstance(meta.get("dataset"), str) else "cifar100"
    dev = resolve_device(device)
    chosen, why = eval_precision(precision, run_precision, dev.type)
    data = load_dataset(dataset, data_dir or "./data", download=download, image_size=image_size, splits=("test",))
    net, arch, data, note = load_for_eval(checkpoint, model, data)  # data: maybe read through the model's transform
    test_loader = make_test_loader(data, dev, batch_size or 1024, workers=workers)
    # as the run evaluates: bf16 autocast on channels-last weights (mixkd.engine), else fp32
    memory_format = torch.channels_last if chosen == "bf16" else torch.contiguous_format
    metrics = evaluate(net.to(dev, memory_format=memory_format), test_loader, chosen)
    return {"checkpoint": str(checkpoint), "model": arch, "dataset": dataset, **metrics,
            "precision": chosen, "precision_from": why, **({"preprocessing": note} if note else {})}
