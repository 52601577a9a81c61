import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))
# mixkd's caches (image-folder indexes) go to a folder of this test session, not the user's ~/.cache
# (subprocesses inherit it).
os.environ["MIXKD_CACHE"] = tempfile.mkdtemp(prefix="mixkd-test-cache-")
atexit.register(shutil.rmtree, os.environ["MIXKD_CACHE"], True)


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory):
    """A tiny learnable CIFAR-10 in the official pickle layout (its parent folder is the --data-dir)."""
    from cifar_fixture import write_fake_cifar

    root = tmp_path_factory.mktemp("cifar10")
    write_fake_cifar(root, num_classes=10, n_train=160, n_test=80, seed=0)
    return root


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory):
    """A resnet8 teacher checkpoint for 10 classes (random weights, seed 0)."""
    from mixkd.checkpoint import save_checkpoint
    from mixkd.models import create_model

    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    torch.manual_seed(0)
    save_checkpoint(path, create_model("resnet8", 10), model_name="resnet8", num_classes=10, epoch=1)
    return path


@pytest.fixture
def one_thread():
    """One intra-op thread for the duration of a test (tiny tensors: faster, and steady on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _environment_as_it_was():
    """Each test leaves os.environ as it found it: a study run in this process points inductor's cache
    at its folder (TORCHINDUCTOR_CACHE_DIR) for the rest of the process, which is a test's tmp_path here."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
