"""t-SNE of penultimate features on a fixed image set, saved so that pictures of several models
(teacher, student alone, KD, KD + mixup, ...) can be laid side by side later.

The set (:func:`mixkd.analysis.inputs.tsne_indices`) is the first 100 test images of each of the
first 10 classes, whatever ``--subset`` says; class c always has colour c of matplotlib's tab10.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mixkd.errors import MixkdError
from mixkd.files import atomic_write

TSNE_FILE = "tsne.npz"
TEACHER_TSNE_FILE = "tsne_teacher.npz"
PERPLEXITY = 30.0


def embed(features: torch.Tensor, seed: int = 0, perplexity: float = PERPLEXITY) -> np.ndarray:
    """2-D t-SNE (scikit-learn, PCA initialization, fixed seed) of (N, D) features, float32 (N, 2)."""
    from sklearn.manifold import TSNE

    x = features.detach().cpu().double().numpy()
    n = x.shape[0]
    if n < 3:
        raise MixkdError(f"t-SNE needs at least 3 images, the fixed set has {n}")
    perplexity = min(perplexity, (n - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(x).astype(np.float32)


def save_embedding(path: str | Path, embedding: np.ndarray, labels: torch.Tensor, indices: torch.Tensor,
                   class_names: Sequence[str], title: str) -> None:
    """Write ``embedding`` (N, 2), the images' ``labels`` and test-set ``indices``, the class names
    and a ``title`` to ``path`` (.npz)."""
    atomic_write(path, lambda tmp: np.savez(tmp, embedding=embedding, labels=labels.cpu().numpy(),
                                            indices=indices.cpu().numpy(), title=np.array(title),
                                            class_names=np.array(list(class_names), dtype=str)))


def load_embedding(path: str | Path) -> dict:
    """A saved embedding: a .npz file, or a run/analysis directory holding ``tsne.npz``."""
    p = Path(path)
    if p.is_dir():
        p = p / TSNE_FILE
    if not p.is_file():
        raise MixkdError(f"no t-SNE embedding at {p}; run 'mixkd analyze' on that run first")
    with np.load(p, allow_pickle=False) as z:
        return {"embedding": z["embedding"], "labels": z["labels"], "indices": z["indices"],
                "class_names": [str(c) for c in z["class_names"]], "title": str(z["title"]), "path": str(p)}


def tsne_montage(items: Sequence[str | Path], labels: Sequence[str] | None, out_png: str | Path,
                 columns: int | None = None) -> Path:
    """Lay saved t-SNE embeddings side by side in one PNG, one panel per item, titled by ``labels``
    (default: each embedding's own title), colours fixed per class, one shared legend.

    ``items``: .npz files (e.g. ``<run>/tsne_teacher.npz``) or directories holding ``tsne.npz``.
    """
    from mixkd.analysis.plots import montage

    if not items:
        raise MixkdError("tsne_montage needs at least one embedding")
    if labels is not None and len(labels) != len(items):
        raise MixkdError(f"tsne_montage: {len(items)} embeddings but {len(labels)} labels")
    panels = [load_embedding(item) for item in items]
    titles = list(labels) if labels is not None else [p["title"] for p in panels]
    montage(panels, titles, out_png, columns=columns)
    return Path(out_png)
