"""``mixkd eval``: the test-set accuracy of a checkpoint, with the data its run was trained on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixkd.data import load_dataset, make_test_loader
from mixkd.device import resolve_device
from mixkd.errors import MixkdError
from mixkd.header import checkpoint_header
from mixkd.loading import load_model
from mixkd.metrics import evaluate
from mixkd.run_folder import CHECKPOINT_NAME, RunFolder


def evaluate_checkpoint(checkpoint: str, dataset: str | None = None, data_dir: str | None = None,
                        model: str | None = None, device: str = "auto", download: bool = False,
                        batch_size: int = 1024, image_size: int | None = None,
                        workers: int | None = None) -> dict[str, Any]:
    """Test-set top-1/top-5/NLL of a mixkd checkpoint (or run directory) or a RepDistiller ``.pth``.

    Unset ``dataset``, ``data_dir`` and ``image_size`` come from the run's ``config.yaml`` (a run
    directory, or its checkpoint file), else from the checkpoint's metadata, else cifar100 in
    ./data. Only the test split is loaded."""
    p = Path(checkpoint)
    run_dir = p if p.is_dir() else p.parent if p.name == CHECKPOINT_NAME else None
    folder = RunFolder(run_dir) if run_dir else None
    cfg = folder.read_config() if folder and folder.config.is_file() else None
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
    data = load_dataset(dataset, data_dir or "./data", download=download, image_size=image_size, splits=("test",))
    net, arch = load_model(checkpoint, model, data.num_classes, image_size=data.image_size)
    test_loader = make_test_loader(data, dev, batch_size, workers=workers)
    metrics = evaluate(net.to(dev), test_loader)
    return {"checkpoint": str(checkpoint), "model": arch, "dataset": dataset, **metrics}
