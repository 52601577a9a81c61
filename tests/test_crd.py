"""CRD's per-sample memory (mdistiller distillers/CRD.py ContrastMemory, dataset/cifar100.py
CIFAR100InstanceSample): the momentum update of a sample's row by hand, the positive its own row, the
negatives of other classes only and uniform over them, a mixed image's index, and runs through
``mixkd distill`` on digits that resume step-exactly."""

import json
import math
from pathlib import Path

import pytest
import torch

import mixkd.methods.crd as crd
from mixkd.checkpoint import load_checkpoint
from mixkd.cli import main
from mixkd.config import build_config
from mixkd.data.layout import BatchLayout
from mixkd.distiller import make_distiller
from mixkd.engine import Run
from mixkd.mix import MixSpec
from mixkd.models import create_model
from mixkd.step import SGD, TrainStep

# 30 samples of 3 classes of unequal sizes, the classes interleaved: 0 has 10, 1 has 5, 2 has 15
LABELS = torch.tensor([0, 2, 1, 2, 0, 2] * 5)


def test_momentum_update_of_the_samples_rows_by_hand():
    m = crd.ContrastMemory(torch.tensor([0, 1]), 3)
    m.memory_s.copy_(torch.tensor([[0.6, 0.8, 0.0], [1.0, 0.0, 0.0]]))
    m.memory_t.copy_(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    # the batch holds sample 1 then sample 0: row * m + v * (1 - m), L2-normalized
    m.update(torch.tensor([1, 0]), torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
             torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), 0.25)
    # row 1: 0.25 (1, 0, 0) + 0.75 (0, 1, 0) = (0.25, 0.75, 0) / sqrt(0.625); row 0: (0.15, 0.2, 0.75) / sqrt(0.625)
    assert m.memory_s.flatten().tolist() == pytest.approx([0.18974, 0.25298, 0.94868, 0.31623, 0.94868, 0.0], abs=1e-5)
    # the teacher's: rows already equal to their embeddings stay
    assert m.memory_t.flatten().tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0, 0.0, 1.0], abs=1e-6)
    assert set(m.state_dict()) == {"memory_s", "memory_t", "z_s", "z_t"}  # what checkpoints save


def test_negatives_are_of_other_classes_and_uniform_over_them():
    torch.manual_seed(0)
    m = crd.ContrastMemory(LABELS, 4)
    others = {c: set(torch.nonzero(LABELS != c).flatten().tolist()) for c in range(3)}
    one_per_class = torch.tensor([0, 2, 1])  # a sample of class 0, 1, 2
    # with replacement: 2000 rows of 10 draws for a sample of class 1, uniform over its 25 others (80 each)
    drawn = m.negatives(torch.full((2000,), 2), 10, replace=True)
    counts = torch.bincount(drawn.flatten(), minlength=30)
    assert set(torch.nonzero(counts).flatten().tolist()) == others[1]
    assert counts[LABELS != 1].min() >= 800 - 5 * 28 and counts[LABELS != 1].max() <= 800 + 5 * 28  # 5 sd
    # the authors' rule at k = 20: class 0 has exactly 20 others (all of them, once each), class 1 25 (20
    # distinct of them), class 2 only 15 (with replacement)
    rows = m.negatives(one_per_class.repeat(500), 20, replace=False).view(500, 3, 20)
    for c in range(3):
        assert set(rows[:, c].flatten().tolist()) == others[c], c
    assert all(sorted(r.tolist()) == sorted(others[0]) for r in rows[:, 0])
    assert all(len(set(r.tolist())) == 20 for r in rows[:, 1])
    picked = torch.bincount(rows[:, 1].flatten(), minlength=30)[LABELS != 1]  # each in a row w.p. 20/25
    assert picked.min() >= 400 - 5 * 9 and picked.max() <= 400 + 5 * 9
    assert any(len(set(r.tolist())) < 20 for r in rows[:, 2])


def test_the_positive_is_the_samples_own_row_and_relax_a_row_of_its_class(monkeypatch):
    torch.manual_seed(0)
    m = crd.ContrastMemory(LABELS, 4)
    index = torch.tensor([4, 2, 29, 13])
    relaxed = torch.stack([m.positives(index, "relax") for _ in range(300)])
    assert torch.equal(LABELS[relaxed], LABELS[index].expand(300, 4))
    assert set(relaxed[:, 1].tolist()) == set(torch.nonzero(LABELS == 1).flatten().tolist())
    # in the term: the scores' first row is the sample's own, the others of other classes
    d = make_distiller("crd", create_model("resnet8", 3), create_model("resnet8", 3).eval(), {"nce_k": 6})
    d.set_training_set(LABELS)
    seen = []

    def spy(anchor, memory, rows, temperature):
        seen.append(rows)
        return real(anchor, memory, rows, temperature)

    real = crd._scores
    monkeypatch.setattr(crd, "_scores", spy)
    d.losses(torch.randn(4, 3, 32, 32), torch.eye(3)[LABELS[index]], index=index)
    assert len(seen) == 2 and all(torch.equal(r[:, 0], index) for r in seen)
    assert all((LABELS[r[:, 1:]] != LABELS[index].unsqueeze(1)).all() for r in seen)


def test_a_mixed_images_index_is_the_sample_it_was_mixed_into():
    """Every image mixed: each refreshes the row of the sample at its batch position with its own embedding."""
    torch.manual_seed(0)
    d = make_distiller("crd", create_model("resnet8", 3), create_model("resnet8", 3).eval(), {"nce_k": 6})
    d.set_training_set(LABELS)
    memory = d.memory["contrast"]
    before = memory.memory_s.clone()
    got = {}
    d.student.register_forward_pre_hook(lambda mod, args: got.update(x=args[0].detach().clone()))
    d.modules["embed_s"].register_forward_hook(lambda mod, args, out: got.update(v=out.detach().clone()))
    x, index = torch.randn(4, 3, 32, 32), torch.tensor([7, 2, 9, 4])
    step = TrainStep(d, SGD(d.parameters(), lr=0.0), MixSpec("mixup", 1.0, 1.0), 3, torch.Generator().manual_seed(0))
    step(*BatchLayout(index=True).pack(x, LABELS[index], index=index))
    assert not torch.allclose(got["x"], x, atol=1e-3)  # the student saw mixed images, in batch order
    rows = 0.5 * before[index] + 0.5 * got["v"]
    assert torch.allclose(memory.memory_s[index], rows / rows.norm(dim=1, keepdim=True), atol=1e-6)
    untouched = torch.ones(30, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(memory.memory_s[untouched], before[untouched])


ARGS = ["distill", "--kd", "crd", "--student", "resnet8", "--dataset", "digits", "--epochs", "1", "--batch-size", "256",
        "--device", "cpu", "--no-progress", "--compile", "off", "kd.nce_k=64"]


def test_crd_trains_on_digits_through_the_cli_and_a_run_stopped_mid_epoch_resumes_exactly(
        teacher_file, tmp_path, one_thread):
    """Without mixing (tests/test_catalogue_methods.py runs it with mixup): the memory, Z and the
    negatives' generator come back from the checkpoint, and the resumed run computes what the whole one did."""
    reference, out = tmp_path / "reference", tmp_path / "stopped"
    assert main(ARGS + ["--teacher", str(teacher_file), "--out", str(reference)]) == 0
    row = json.loads((reference / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["train_feat"]) and row["train_feat"] > 0
    flags = {"task": "distill", "model": "resnet8", "dataset": "digits", "batch_size": 256, "epochs": 1,
             "device": "cpu", "progress": False, "out": str(out), "compile": "off", "kd.method": "crd",
             "kd.teacher": str(teacher_file), "kd.nce_k": 64}
    job = Run(build_config(flags=flags))
    job.start()
    while job.step_in_epoch < 3:
        job.advance()
    job.stop("time")
    state = load_checkpoint(out).state
    assert state["distiller.contrast.memory_s"].shape == (1437, 128) and state["distiller.contrast.z_s"] > 0
    assert main(["distill", "--out", str(out), "--resume", "--no-progress"]) == 0
    rows = [json.loads(Path(p, "metrics.jsonl").read_text().splitlines()[0]) for p in (reference, out)]
    assert {k: v for k, v in rows[0].items() if k.startswith("train_")} == {
        k: v for k, v in rows[1].items() if k.startswith("train_")}
    a, b = load_checkpoint(reference).state_dict, load_checkpoint(out).state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


WORKER = """
import sys, torch
from mixkd import distributed
from mixkd.distiller import make_distiller
from mixkd.models import create_model
rank, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
distributed.setup(torch.device("cpu"), "gloo", distributed.Launch(rank, 2, rank, 2, "127.0.0.1", port, "torchrun"))
torch.manual_seed(rank)  # each rank draws another initial memory: rank 0's must win
d = make_distiller("crd", create_model("resnet8", 3), create_model("resnet8", 3).eval(), {"nce_k": 6})
labels = torch.tensor([0, 2, 1, 2, 0, 2] * 5)
d.set_training_set(labels)
d.data_parallel(torch.device("cpu"))
m = d.memory["contrast"]
before = m.memory_s.clone()
index = torch.tensor([[7, 2], [9, 4]])[rank]  # each rank's part of the global batch
d.losses(torch.randn(2, 3, 32, 32), torch.eye(3)[labels[index]], index=index)["loss"].backward()
torch.save({"before": before, "memory_s": m.memory_s, "memory_t": m.memory_t, "z": torch.stack([m.z_s, m.z_t])},
           f"{out}/{rank}.pt")
distributed.shutdown()
"""


def test_under_data_parallelism_every_rank_holds_the_same_memory(tmp_path):
    """2 gloo ranks, each with half of a batch: the memory starts as rank 0's, and after a step every rank
    holds the rows of both halves refreshed (the same on both), and the same Z."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(port), str(tmp_path)], env=env,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    a, b = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert torch.equal(a["before"], b["before"])
    assert torch.equal(a["memory_s"], b["memory_s"]) and torch.equal(a["memory_t"], b["memory_t"])
    assert torch.equal(a["z"], b["z"]) and (a["z"] > 0).all()
    changed = (a["memory_s"] != a["before"]).any(dim=1)
    assert sorted(torch.nonzero(changed).flatten().tolist()) == [2, 4, 7, 9]
