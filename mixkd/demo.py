"""``mixkd demo``: the study in miniature, on scikit-learn's digits, on the CPU in a few minutes."""

from __future__ import annotations

from pathlib import Path

from mixkd.config import RunConfig
from mixkd.engine import run

TEACHER, STUDENT = "resnet20", "resnet8"
DEMO_EPOCHS = 12

# (run name, label in the table, config keys)
DEMO_RUNS = [
    ("teacher", f"teacher {TEACHER}", {"task": "train", "model": TEACHER}),
    ("student", f"student {STUDENT} alone", {"task": "train"}),
    ("kd", "KD (T=4)", {"task": "distill", "kd": {"method": "kd", "temperature": 4.0}}),
    ("kd_pmu", "KD (T=4) + partial mixup 10%",
     {"task": "distill", "kd": {"method": "kd", "temperature": 4.0}, "mix": {"method": "mixup", "fraction": 0.1}}),
    ("std_pmu", "standardized KD + partial mixup 10%",
     {"task": "distill", "kd": {"method": "std"}, "mix": {"method": "mixup", "fraction": 0.1}}),
]


def demo_config(name: str, keys: dict, out: Path, epochs: int, device: str, seed: int) -> RunConfig:
    tree = {"model": STUDENT, "dataset": "digits", "epochs": epochs, "batch_size": 64, "seed": seed,
            "device": device, "out": str(out / name), "save_every": epochs, "eval_batch_size": 512,
            "optim": {"lr": 0.05}, **keys}
    if tree["task"] == "distill":
        tree["kd"] = {**tree["kd"], "teacher": str(out / "teacher")}
    return RunConfig.model_validate(tree)


def run_demo(out: str | Path = "runs/demo", epochs: int | None = None, device: str = "cpu", seed: int = 0) -> list[dict]:
    """Train the teacher and the student alone, distill three students, print the table."""
    out = Path(out)
    epochs = epochs or DEMO_EPOCHS
    print(f"mixkd demo: digits (8x8 upsampled to 32x32, 10 classes), {epochs} epochs per run, device {device}")
    results = []
    for name, label, keys in DEMO_RUNS:
        cfg = demo_config(name, keys, out, epochs, device, seed)
        print(f"  [{len(results) + 1}/{len(DEMO_RUNS)}] {label} ...", flush=True)
        result = run(cfg, resume=True)  # an interrupted demo picks up where it stopped
        results.append({"run": name, "label": label, **result})
    width = max(len(r["label"]) for r in results)
    print()
    print(f"{'run':<{width}}  top-1 (last)  best top-1  wall s")
    for r in results:
        print(f"{r['label']:<{width}}  {r['top1']:>11.2f}%  {r['best_top1']:>9.2f}%  {r['wall_seconds']:>6.1f}")
    print(f"\nruns written to {out}/ (config.yaml, metrics.jsonl, checkpoint.safetensors, result.json in each)")
    return results
