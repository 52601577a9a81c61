"""Image-folder throughput: decoded-and-augmented images/s per DataLoader worker count, and GPU JPEG decoding.

CPU mode (always): mixkd's own training pipeline for image folders, as a run uses it: the split listed
through its index (mixkd.data.folder_index), read by mixkd.data.FolderLoader (a DataLoader whose workers
decode each JPEG with PIL and apply the recipe's RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor
+ Normalize under the sample's own seed), batches collated in the main process. For each worker count
(--workers 0,1,2,...) it reports images/s after the first batch, images/s per worker, and the first
batch's time (worker start-up included). Divide a GPU step's images/s by the per-worker figure to
know how many workers feed it (on a machine with that many free cores).

GPU mode (only where CUDA is present; elsewhere one line says it was skipped): the same JPEG files read
as bytes and decoded in batches by torchvision.io.decode_jpeg(device="cuda") (nvJPEG), images/s per
batch size, then decode + RandomResizedCrop(224) + flip on the GPU (torchvision.transforms.v2).

  python bench/data_bench.py                                   # generated JPEGs (ImageNet-sized), workers 0,1,2
  python bench/data_bench.py --data-dir /data/imagenet --workers 0,2,4,8,16 --json data.json
  python bench/data_bench.py --small                           # smoke mode: tiny sizes, the figures mean nothing

Without --data-dir it writes --images JPEG files of --image-size (default 2048 of 500 x 375, about
ImageNet's mean size, quality 90; --distinct 256 of them encoded, the others hard links to those) in
--classes class folders under a temporary folder (or --make DIR, kept); they are read from the page
cache, so the figures are decoding and augmentation, not disk reads. The first round of batches (one
per worker) arrives in a burst when the workers start together: the rate is timed after it. No figure
here is a pass/fail test: tests/test_data_bench.py only checks that it runs and writes its table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mixkd.data import FolderLoader, load_dataset
from mixkd.data.loaders import available_cores

CROP = 224


def make_jpegs(root: Path, images: int, classes: int, size: tuple[int, int], distinct: int | None = None,
               seed: int = 0) -> Path:
    """``root/train/c<k>/<i>.JPEG`` (``images`` files, of which ``distinct`` are encoded and the rest hard
    links to them) and one image per class in ``root/val/``: smooth random colour fields with noise
    (JPEG sizes like photographs', not like pure noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    distinct = min(distinct or images, images)
    for split, count in (("train", images), ("val", classes)):
        made: list[Path] = []
        for i in range(count):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"{i:06d}.JPEG"
            if i >= distinct:
                try:
                    os.link(made[i % distinct], path)
                    continue
                except OSError:  # no hard links here: encode it too
                    pass
            coarse = rng.uniform(0, 255, size=(h // 25 + 2, w // 25 + 2, 3)).astype(np.uint8)
            img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
            arr = np.clip(np.asarray(img, dtype=np.int16) + rng.normal(0, 12, size=(h, w, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(path, format="JPEG", quality=90)
            made.append(path)
    return root


def cpu_rates(data_dir: Path, workers: list[int], batch_size: int, batches: int, crop: int) -> list[dict]:
    spec = load_dataset("imagefolder", data_dir, image_size=crop, splits=("train",))
    if len(spec.train) < batch_size * 2:
        raise SystemExit(f"data_bench: {data_dir}/train has {len(spec.train)} images; need at least "
                         f"2 batches of {batch_size}")
    rows = []
    for w in workers:
        loader = FolderLoader(spec.train, batch_size, "cpu", shuffle=True, drop_last=True, workers=w)
        # The workers start together, so their first batches arrive in a burst: the rate is timed from
        # the batch after that first round on (the loop consumes at once, so no prefetched backlog remains).
        skip = min(w + 1, len(loader) - 1)
        timed = min(batches, len(loader) - skip)
        loader.set_epoch_seed(0)
        t0 = time.perf_counter()
        it = iter(loader)
        next(it)  # worker start-up and the first batch
        first = time.perf_counter() - t0
        for _ in range(skip - 1):
            next(it)
        t1 = time.perf_counter()
        for _ in range(timed):
            next(it)
        t2 = time.perf_counter()
        del it, loader  # stops the workers
        rate = timed * batch_size / (t2 - t1)
        rows.append({"workers": w, "images_per_s": rate, "per_worker": rate / max(w, 1),
                     "first_batch_s": first, "timed_images": timed * batch_size})
        print(f"  workers {w:2d}: {rate:8.1f} images/s  ({rate / max(w, 1):7.1f} per worker)  "
              f"first batch {first:5.2f} s  ({timed} x {batch_size} images timed after {skip})", flush=True)
    return rows


def decode_rates(data_dir: Path, batch_sizes: list[int], rounds: int, crop: int, device: str = "cuda") -> list[dict]:
    """torchvision.io.decode_jpeg of batches of the split's files on ``device`` (the GPU mode; the
    smoke test runs it on the CPU), then the same + RandomResizedCrop(crop) + flip there."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms import v2

    # torchvision 0.29 deprecates its decoders in favour of TorchCodec; decode_jpeg(device="cuda") is still
    # what this measures
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def decode(batch: list[torch.Tensor]) -> list[torch.Tensor]:
        return decode_jpeg(batch, mode=ImageReadMode.RGB, device=device)  # RGB: ImageNet has CMYK and grey JPEGs

    spec = load_dataset("imagefolder", data_dir, image_size=crop, splits=("train",))
    files = [read_file(spec.train.samples[i][0]) for i in range(len(spec.train))]
    augment = v2.Compose([v2.RandomResizedCrop(crop, antialias=True), v2.RandomHorizontalFlip()])
    decode(files[:2])  # nvJPEG's start-up, not timed
    sync()
    rows = []
    for b in batch_sizes:
        batches = [files[i:i + b] for i in range(0, len(files) - b + 1, b)][:max(1, rounds)]
        if not batches:
            continue
        t0 = time.perf_counter()
        for batch in batches:
            decode(batch)
        sync()
        t1 = time.perf_counter()
        for batch in batches:
            out = torch.stack([augment(img) for img in decode(batch)])
        sync()
        t2 = time.perf_counter()
        assert out.shape == (b, 3, crop, crop) and out.device.type == torch.device(device).type
        n = len(batches) * b
        rows.append({"batch": b, "decode_images_per_s": n / (t1 - t0), "decode_crop_images_per_s": n / (t2 - t1),
                     "timed_images": n})
        print(f"  batch {b:4d}: decode {n / (t1 - t0):9.1f} images/s, decode + crop + flip "
              f"{n / (t2 - t1):9.1f} images/s ({n} images)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="an ImageNet-layout folder (train/<class>/<image>); default: generated JPEGs")
    p.add_argument("--make", help="where to write the generated JPEGs (kept); default: a temporary folder")
    p.add_argument("--images", type=int, default=2048, help="generated training images (default 2048)")
    p.add_argument("--distinct", type=int, default=256, help="of which encoded, the rest hard links (default 256)")
    p.add_argument("--classes", type=int, default=8, help="generated class folders (default 8)")
    p.add_argument("--image-size", default="500x375", help="generated image size WxH (default 500x375)")
    p.add_argument("--workers", default="0,1,2", help="worker counts to measure (default 0,1,2)")
    p.add_argument("--batch-size", type=int, default=32, help="CPU mode batch size (default 32)")
    p.add_argument("--batches", type=int, default=40, help="timed batches per worker count, after the workers' first round (default 40)")
    p.add_argument("--gpu-batches", default="64,256", help="GPU mode batch sizes (default 64,256)")
    p.add_argument("--gpu-rounds", type=int, default=4, help="GPU mode batches per batch size (default 4)")
    p.add_argument("--crop", type=int, default=CROP, help=f"RandomResizedCrop size (default {CROP})")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU mode")
    p.add_argument("--small", action="store_true", help="smoke mode: 48 images of 64x48, batch 8, 2 timed batches")
    p.add_argument("--json", help="also write the figures as JSON here")
    a = p.parse_args(argv)
    if a.small:
        a.images, a.distinct, a.classes, a.image_size, a.batch_size, a.batches, a.crop = 48, 24, 4, "64x48", 8, 2, 32
        a.gpu_batches, a.gpu_rounds = "8", 1
    workers = [int(w) for w in a.workers.split(",")]
    size = tuple(int(v) for v in a.image_size.lower().split("x"))
    meta = {"command": " ".join([os.path.basename(sys.argv[0]) or "data_bench.py", *(argv or sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
            "cpu": platform.processor() or platform.machine(), "cores_available": available_cores(),
            "load_average": list(os.getloadavg()), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    with tempfile.TemporaryDirectory(prefix="mixkd-data-bench-") as tmp:
        if a.data_dir:
            data_dir = Path(a.data_dir).expanduser()
            source = f"{data_dir} (user's)"
        else:
            data_dir = make_jpegs(Path(a.make or tmp), a.images, a.classes, size, a.distinct)
            source = (f"{a.images} generated JPEG files ({min(a.distinct, a.images)} distinct, the rest hard links) of "
                      f"{size[0]}x{size[1]} (quality 90) in {a.classes} classes, read from the page cache")
        meta["data"] = source
        print(f"data_bench: {source}; {meta['cores_available']} cores available, load average "
              f"{' '.join(f'{v:.2f}' for v in meta['load_average'])}; torch {torch.__version__}", flush=True)
        print(f"CPU: decode (PIL) + RandomResizedCrop({a.crop}) + flip + ToTensor + Normalize, "
              f"mixkd FolderLoader, batch {a.batch_size}", flush=True)
        cpu = cpu_rates(data_dir, workers, a.batch_size, a.batches, a.crop)
        gpu = None
        if not a.no_gpu:
            print(f"GPU: torchvision.io.decode_jpeg(device='cuda') batches, then + RandomResizedCrop({a.crop}) + flip",
                  flush=True)
            if torch.cuda.is_available():
                gpu = decode_rates(data_dir, [int(b) for b in a.gpu_batches.split(",")], a.gpu_rounds, a.crop)
            else:
                print("GPU mode: no CUDA here, skipped", flush=True)
    print("\n| workers | images/s | per worker | first batch (s) |\n|---|---|---|---|")
    for r in cpu:
        print(f"| {r['workers']} | {r['images_per_s']:.1f} | {r['per_worker']:.1f} | {r['first_batch_s']:.2f} |")
    if gpu:
        print("\n| GPU batch | decode images/s | decode + crop + flip images/s |\n|---|---|---|")
        for r in gpu:
            print(f"| {r['batch']} | {r['decode_images_per_s']:.0f} | {r['decode_crop_images_per_s']:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "cpu": cpu, "gpu": gpu}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
