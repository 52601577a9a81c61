"""Break each core formula once and check that the test suite notices (mutation testing by hand).

  python bench/mutations.py                 # every mutation, about 5 minutes on 2 CPU cores
  python bench/mutations.py --only kd-t2    # one of them (names: --list)

Each mutation replaces one exact piece of mixkd's source (it must occur exactly once) in a copy of
the package in a temporary folder, runs the tests that should catch it against that copy, and prints
the tests that failed. A mutation no test catches is reported as SURVIVED and the exit status is 1.
The working tree is never modified.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str  # inside mixkd/
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the repository root


MIX_TESTS = ("tests/test_mix.py", "tests/test_step.py::test_step_loss_is_the_objective_on_the_batch_mixed_with_the_runs_generator")
LOSS_TESTS = ("tests/test_losses.py", "tests/test_step.py::test_step_loss_is_the_objective_on_the_batch_mixed_with_the_runs_generator")

MUTATIONS = (
    Mutation("mixup-images-unmixed", "mixup returns the images unmixed", "mix.py",
             "    x_mixed = lam_x * x + (1 - lam_x) * x[partner]\n", "    x_mixed = x\n", MIX_TESTS),
    Mutation("cutmix-images-unmixed", "CutMix returns the images unmixed", "mix.py",
             "    x_mixed = torch.where(box[:, None], x[partner], x)\n", "    x_mixed = x\n", MIX_TESTS),
    Mutation("mixup-labels-unmixed", "mixup returns the labels unmixed", "mix.py",
             "    y_mixed = lam_y * y + (1 - lam_y) * y[partner]\n    return x_mixed, y_mixed\n\n\ndef cutmix",
             "    y_mixed = y\n    return x_mixed, y_mixed\n\n\ndef cutmix", MIX_TESTS),
    Mutation("cutmix-labels-unmixed", "CutMix returns the labels unmixed", "mix.py",
             "    y_mixed = lam_y * y + (1 - lam_y) * y[partner]\n    return x_mixed, y_mixed\n\n\ndef partial_mixup",
             "    y_mixed = y\n    return x_mixed, y_mixed\n\n\ndef partial_mixup", MIX_TESTS),
    Mutation("mix-identity", "mixing is the identity (mixup and CutMix)", "mix.py",
             "    fn = mixup if spec.method == \"mixup\" else cutmix\n    return fn(",
             "    return x, y_onehot\n    fn = mixup if spec.method == \"mixup\" else cutmix\n    return fn(", MIX_TESTS),
    Mutation("partial-one-too-many", "partial mixup mixes round(f * B) + 1 samples", "mix.py",
             "[: mixed_count(batch_size, fraction)]", "[: mixed_count(batch_size, fraction) + 1]", MIX_TESTS),
    Mutation("mixed-count-rounds-down", "round(f * B) rounds halves down", "mix.py",
             "int(math.floor(fraction * batch_size + 0.5))", "int(math.ceil(fraction * batch_size - 0.5))",
             MIX_TESTS),
    Mutation("partial-ignores-mask", "partial mixup mixes every sample", "mix.py",
             "        lam = torch.where(mask, lam, torch.ones_like(lam))\n", "        pass\n", MIX_TESTS),
    Mutation("kd-without-t2", "Hinton KD without its T^2", "losses.py",
             "    return _kl_batchmean(log_p_s, p_t) * (t * t)\n", "    return _kl_batchmean(log_p_s, p_t)\n",
             LOSS_TESTS),
    Mutation("std-biased", "standardization by the biased std", "losses.py",
             "    return logits / logits.std(dim=-1, keepdim=True)\n",
             "    return logits / logits.std(dim=-1, keepdim=True, correction=0)\n", LOSS_TESTS),
    Mutation("std-ce-raw-logits", "standardized KD's CE on the raw logits", "losses.py",
             "            ce = soft_cross_entropy(standardize(student_logits), target)\n",
             "            ce = soft_cross_entropy(student_logits, target)\n", LOSS_TESTS),
    Mutation("cutmix-weight-from-lambda", "CutMix's label weight is lambda, not the pasted area", "mix.py",
             "    lam_area = 1.0 - box.flatten(1).float().mean(dim=1)\n",
             "    lam_area = lam\n", MIX_TESTS),
    Mutation("self-pairs-identity", "every sample is its own partner", "mix.py",
             "    partner[order] = order.roll(-1)\n", "    partner[order] = order\n", MIX_TESTS),
    Mutation("self-pairs-released", "partners from an independent permutation (the released code: some self pairs)",
             "mix.py", "    partner[order] = order.roll(-1)\n    return partner\n",
             "    return random_permutation(batch_size, generator, device)\n", MIX_TESTS),
)


def run(m: Mutation, workdir: Path) -> list[str]:
    """The tests that failed with ``m`` applied (pytest's FAILED/ERROR lines)."""
    copy = workdir / m.name
    shutil.copytree(ROOT / "mixkd", copy / "mixkd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", copy / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    path = copy / "mixkd" / m.file
    source = path.read_text()
    if source.count(m.old) != 1:
        raise SystemExit(f"{m.name}: the text to replace occurs {source.count(m.old)} times in mixkd/{m.file} "
                         "(expected once); update the mutation to today's source")
    mutated = source.replace(m.old, m.new)
    compile(mutated, str(path), "exec")  # a mutation must break a formula, not the syntax
    path.write_text(mutated)
    env = {**os.environ, "PYTHONPATH": str(copy)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-p", "no:randomly",
                           *m.tests], cwd=copy, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # 2-5: interrupted, internal or usage error, no tests collected
        raise SystemExit(f"{m.name}: pytest exited with {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return [line.split()[1] for line in proc.stdout.splitlines() if re.match(r"(FAILED|ERROR) ", line)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", help="run only this mutation (repeatable)")
    p.add_argument("--list", action="store_true", help="list the mutations")
    args = p.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list or not chosen:
        for m in MUTATIONS:
            print(f"{m.name:28} {m.what}")
        return 0 if args.list else 2
    survived = []
    with tempfile.TemporaryDirectory(prefix="mixkd-mutations-") as tmp:
        for m in chosen:
            failed = run(m, Path(tmp))
            print(f"{m.name:28} {'caught by ' + str(len(failed)) if failed else 'SURVIVED'}: {m.what}")
            for t in failed:
                print(f"    {t}")
            sys.stdout.flush()
            if not failed:
                survived.append(m.name)
    print("every mutation was caught" if not survived else f"survived: {', '.join(survived)}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
