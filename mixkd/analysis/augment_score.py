"""Scoring augmentation policies before training: Wang et al.'s "T. stddev" (``mixkd augment-score``).

Wang, Lohit, Jones, Fu, "What Makes a 'Good' Data Augmentation in Knowledge Distillation - A Statistical
Perspective" (NeurIPS 2022; MingSun-Tse/Good-DA-in-KD, ``helper/loops.py``): draw N batches of augmented
training data, take the teacher's class probabilities on each, average them over the batch
(``avg_prob = softmax(logit_t / T).mean(0)``, one vector of C class probabilities per batch), and take the
standard deviation of that vector over the N batches, averaged over the classes
(``stack(avg_probs).std(0).mean()``; torch's unbiased std). A lower T. stddev predicts a better student
(claim 6 of :mod:`mixkd.claims` tests that ranking on a study's results).

Here the probabilities are taken at the KD temperature (issue 28), and the statistic comes with a basic
bootstrap interval over the N batches (resampled with replacement), and the teacher's mean entropy (nats, at
the same temperature) on the same samples.

Pure functions: :func:`batch_mean_probs`, :func:`t_stddev`, :func:`bootstrap_interval`,
:func:`entropy`; :func:`augment_batch` puts a raw batch through a policy pipeline, :func:`score_policy` runs
the teacher over a pipeline's batches and
:func:`augment_score` does the whole command (a teacher run, the dataset's training split, each policy's
pipeline from :func:`mixkd.augment.make_pipeline`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mixkd.errors import MixkdError

DEFAULT_BATCHES = 200  # batches per policy (200 x 64 = 12,800 images): the interval covered 92% at 200, 80% at 50 (BENCHMARKS.md)
DEFAULT_BATCH_SIZE = 64  # the recipe's batch (docs/study-claims-reference.md): the statistic depends on it (a mean over the batch)
DEFAULT_TEMPERATURE = 4.0  # the KD temperature of the study's recipe (RepDistiller; docs/study-claims-reference.md)
BOOTSTRAP_REPS = 2000
LEVEL = 0.95
DEFAULT_POLICIES = ("none", "flip_crop", "cutout", "autoaugment", "mixup", "cutmix", "cutmix_pick")


def batch_mean_probs(logits: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """The teacher's class probabilities at ``temperature`` averaged over a batch: (B, C) logits -> (C,)."""
    return F.softmax(logits.float() / temperature, dim=-1).mean(0)


def t_stddev(means: torch.Tensor) -> float:
    """T. stddev of (N, C) batch-mean probabilities (N >= 2 batches): the unbiased standard deviation over the
    batches, averaged over the classes."""
    if means.dim() != 2 or means.shape[0] < 2:
        raise MixkdError(f"T. stddev needs at least 2 batches of class probabilities (N, C), got {tuple(means.shape)}")
    return float(means.double().std(0).mean())


def entropy(logits: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """Each sample's entropy (nats) of ``softmax(logits / temperature)``: (B, C) -> (B,)."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def bootstrap_interval(means: torch.Tensor, reps: int = BOOTSTRAP_REPS, level: float = LEVEL,
                       generator: torch.Generator | None = None, chunk: int = 250) -> tuple[float, float]:
    """The basic (reverse percentile) bootstrap interval of :func:`t_stddev` over the batches: ``reps`` resamples
    of the N batches with replacement, ``[2 est - q_high, 2 est - q_low]`` (low clipped at 0). A resample repeats
    batches, so its spread falls short of the estimate's: the percentile interval sits below the estimate and
    covered the true value less often in simulation (bench/augment_score_sim.py, BENCHMARKS.md). Drawn
    ``chunk`` resamples at a time (memory: chunk x N x C doubles)."""
    n = means.shape[0]
    if n < 2:
        raise MixkdError(f"a bootstrap interval needs at least 2 batches, got {n}")
    data = means.double()
    stats = torch.cat([data[torch.randint(0, n, (min(chunk, reps - start), n), generator=generator)].std(1).mean(-1)
                       for start in range(0, reps, chunk)])
    tail = (1 - level) / 2
    q_low, q_high = torch.quantile(stats, torch.tensor([tail, 1 - tail], dtype=stats.dtype)).tolist()
    est = t_stddev(means)
    return max(0.0, 2 * est - q_high), 2 * est - q_low


@dataclass(frozen=True)
class PolicyScore:
    """One policy's row of the table."""

    policy: str
    batches: int
    t_stddev: float
    low: float
    high: float
    entropy: float  # the teacher's mean entropy (nats) at the temperature, over every sample scored
    temperature: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_means(policy: str, means: torch.Tensor, entropies: torch.Tensor, temperature: float,
                reps: int = BOOTSTRAP_REPS, generator: torch.Generator | None = None) -> PolicyScore:
    """A policy's score from its (N, C) batch-mean probabilities and its per-sample entropies."""
    low, high = bootstrap_interval(means, reps, generator=generator)
    return PolicyScore(policy, int(means.shape[0]), t_stddev(means), low, high, float(entropies.double().mean()),
                       temperature)


def augment_batch(pipeline: Any, x: torch.Tensor, y_onehot: torch.Tensor, teacher: torch.nn.Module,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A raw uint8 batch through a policy pipeline (:mod:`mixkd.augment`): the per-sample stage with the
    loader-native policies too (``sample(x, native=True)``: there is no loader here), then the batch stage:
    mixup or CutMix by :func:`mixkd.mix.mix_batch` (every sample, Beta(1, 1), as the policy's defaults), or a
    policy that picks with the models (CutMixPick: its pool of candidates, scored by the teacher, the kept ones
    returned; a criterion that needs the student is refused: augment-score runs the teacher only)."""
    from mixkd.mix import MixSpec, mix_batch

    x = pipeline.sample(x, native=True)
    batch = getattr(pipeline, "batch", None)
    if batch is None:
        return x
    if getattr(batch, "needs_models", False):
        criterion = getattr(batch.settings, "criterion", "teacher_entropy")
        if criterion != "teacher_entropy":
            raise MixkdError(f"{pipeline.spec}: augment-score runs the teacher only, so it scores a pick by the "
                             f"teacher's entropy; {criterion} needs the student: use criterion teacher_entropy")
        pool, _ = batch.candidates(x, y_onehot, generator)  # the candidates and their labels
        return pool.index_select(0, batch.pick(pool, teacher(pool), None, x.shape[0]))
    return mix_batch(x, y_onehot, MixSpec(batch.method), generator)[0]


@torch.no_grad()
def score_policy(teacher: torch.nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], pipeline: Any,
                 num_classes: int, n: int, temperature: float = DEFAULT_TEMPERATURE,
                 progress: Callable[[int], None] | None = None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the teacher on ``n`` batches augmented by ``pipeline`` (:func:`augment_batch`). Returns the (n, C)
    batch-mean probabilities and every sample's entropy. The teacher only: no student, no gradient."""
    means, ents = [], []
    for i in range(n):
        x, y = next(batches)
        logits = teacher(augment_batch(pipeline, x, F.one_hot(y, num_classes).float(), teacher, generator))
        means.append(batch_mean_probs(logits, temperature))
        ents.append(entropy(logits, temperature))
        if progress is not None:
            progress(i + 1)
    return torch.stack(means).cpu(), torch.cat(ents).cpu()


def random_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device,
                   generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of an in-memory split, each epoch in a fresh random order (as training draws them)."""
    n = images.shape[0]
    if n < batch_size:
        raise MixkdError(f"the training split has {n} images, fewer than --batch-size {batch_size}: use a smaller "
                         "batch size")
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            yield images[idx].to(device), labels[idx].to(device)


def parse_policies(text: str) -> list[str]:
    """'none,flip_crop,cutout' -> the policy specs, in order (each is checked by the pipeline itself)."""
    specs = [s.strip() for s in text.split(",")]
    if not text.strip() or any(not s for s in specs):
        raise MixkdError(f"--augment {text!r}: give a comma-separated list of policy specs, e.g. "
                         f"{','.join(DEFAULT_POLICIES)}")
    repeated = sorted({s for s in specs if specs.count(s) > 1})
    if repeated:
        raise MixkdError(f"--augment lists {', '.join(repeated)} twice: give each policy once")
    return specs


def augment_score(teacher_path: str, policies: Sequence[str], *, teacher_model: str | None = None,
                  dataset: str | None = None, data_dir: str | None = None, batches: int = DEFAULT_BATCHES,
                  batch_size: int = DEFAULT_BATCH_SIZE, temperature: float | None = None, device: str = "auto",
                  seed: int = 0, reps: int = BOOTSTRAP_REPS, make_pipeline: Callable[..., Any] | None = None,
                  progress: Callable[[str, int, int], None] | None = None) -> list[PolicyScore]:
    """Score each policy of ``policies`` with the teacher of ``teacher_path`` (a run folder or checkpoint).

    Unset arguments come from the run's ``config.yaml`` where there is one: ``dataset``, ``data_dir`` and the
    temperature (a distillation run's ``kd.temperature``; else :data:`DEFAULT_TEMPERATURE`). ``make_pipeline``:
    the policy pipeline factory (default :func:`mixkd.augment.make_pipeline`, the registry's). Every policy sees
    batches drawn by one seed, so policies differ in their augmentation only. ``progress(policy, done, total)``
    is called after each batch."""
    from mixkd.checkpoint import load_checkpoint
    from mixkd.data import load_dataset
    from mixkd.device import resolve_device
    from mixkd.loading import load_teacher
    from mixkd.models.preprocess import Preprocessing
    from mixkd.run_folder import RunFolder

    if batches < 2:
        raise MixkdError(f"--batches must be at least 2 (a standard deviation over batches), got {batches}")
    if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
        raise MixkdError(f"--temperature must be a positive number, got {temperature}")
    if make_pipeline is None:
        try:
            from mixkd.augment import make_pipeline  # the policy registry's pipeline (mixkd.augment owns policies)
        except ImportError:
            raise MixkdError("mixkd augment-score needs the augmentation policies (mixkd.augment, issue 28), which "
                             "this mixkd lacks: update mixkd") from None
    p = Path(teacher_path)
    if not p.exists():
        raise MixkdError(f"--teacher {teacher_path}: no such run folder or checkpoint")
    folder = RunFolder(p) if p.is_dir() else None
    cfg = folder.read_config() if folder is not None and folder.config.is_file() else None
    ckpt = load_checkpoint(p)
    dataset = dataset or (cfg.dataset if cfg else None) or ckpt.meta.get("dataset") or "cifar100"
    data_dir = data_dir or (cfg.data_dir if cfg else None)
    if temperature is None:
        temperature = cfg.kd.temperature if cfg is not None and cfg.task == "distill" else DEFAULT_TEMPERATURE
    dev = resolve_device(device)
    spec = load_dataset(dataset, data_dir, image_size=cfg.image_size if cfg else None, splits=("train",))
    train = spec.train
    if not hasattr(train, "images"):
        raise MixkdError(f"mixkd augment-score scores in-memory datasets (CIFAR, digits); {dataset} is an image "
                         "folder")
    # as a distillation feeds it: library weights get their own preprocessing of the student's view
    data_view = Preprocessing(spec.image_size, spec.mean, spec.std, crop_pct=spec.crop_pct)
    teacher, _ = load_teacher(str(p), teacher_model, spec.num_classes, dev, data=data_view,
                              teacher_input=cfg.kd.teacher_input if cfg is not None else "auto", view="same")
    scores = []
    for policy in policies:
        gen = torch.Generator(device=dev).manual_seed(seed)
        pipeline = make_pipeline(policy, {}, image_size=spec.image_size, mean=spec.mean, std=spec.std, device=dev,
                                 generator=gen, dataset=dataset, temperature=temperature)
        draws = random_batches(train.images, train.labels, batch_size, dev, torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)  # the per-sample policies draw from torch's global generator
        means, ents = score_policy(teacher, draws, pipeline, spec.num_classes, batches, temperature,
                                   None if progress is None else (lambda i, policy=policy: progress(policy, i, batches)),
                                   generator=gen)
        scores.append(score_means(policy, means, ents, temperature, reps, torch.Generator().manual_seed(seed)))
    return scores


SCORES_NAME = "augment-score.json"  # in a teacher's run folder: its scores, one per policy spec
SCORES_FORMAT = "mixkd-augment-score-1"


def save_scores(run_dir: str | Path, scores: Sequence[PolicyScore], batch_size: int) -> Path:
    """Add ``scores`` to ``run_dir``'s :data:`SCORES_NAME` (a policy scored again replaces its entry; atomic):
    ``{"format", "scores": {spec: {...PolicyScore, "batch_size"}}}``, which a study's report reads to give
    each student its teacher's T. stddev (claim 6)."""
    from mixkd.files import atomic_write_text, read_json

    path = Path(run_dir) / SCORES_NAME
    saved = read_json(path, "delete it: mixkd augment-score writes it anew") if path.exists() else {}
    entries = dict(saved.get("scores", {})) if isinstance(saved, dict) else {}
    entries.update({s.policy: {**s.as_dict(), "batch_size": batch_size} for s in scores})
    atomic_write_text(path, json.dumps({"format": SCORES_FORMAT, "scores": entries}, indent=1) + "\n")
    return path


def read_scores(run_dir: str | Path) -> dict[str, float]:
    """{policy spec: T. stddev} saved in ``run_dir`` by :func:`save_scores` ({} where there is none)."""
    from mixkd.files import read_json

    path = Path(run_dir) / SCORES_NAME
    if not path.is_file():
        return {}
    saved = read_json(path, "delete it: mixkd augment-score writes it anew")
    entries = saved.get("scores") if isinstance(saved, dict) else None
    if not isinstance(entries, dict):
        raise MixkdError(f"{path} is not an augment-score file (no 'scores'): delete it; mixkd augment-score writes "
                         "it anew")
    return {spec: float(e["t_stddev"]) for spec, e in entries.items() if isinstance(e, dict) and "t_stddev" in e}


def format_scores(scores: Sequence[PolicyScore]) -> str:
    """The table ``mixkd augment-score`` prints, lowest T. stddev first (the best predicted student)."""
    if not scores:
        return "no policies scored"
    t, n = scores[0].temperature, scores[0].batches
    width = max(len("policy"), *(len(s.policy) for s in scores))
    lines = [f"T. stddev (Wang et al. 2022): std over {n} batches of the teacher's batch-mean class probability at "
             f"T = {t:g}, averaged over classes; 95% bootstrap interval over batches; lower predicts a better student",
             f"{'policy':<{width}}  {'T. stddev':>10}  {'95% interval':>22}  {'entropy':>8}"]
    for s in sorted(scores, key=lambda s: s.t_stddev):
        lines.append(f"{s.policy:<{width}}  {s.t_stddev:>10.3e}  [{s.low:.3e}, {s.high:.3e}]  {s.entropy:>8.4f}")
    return "\n".join(lines)
