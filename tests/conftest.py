"""Test setup: make the repo root importable and point the data tests at CIFAR10_DIR; the
``one_thread`` fixture for test modules that train small models."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for tiny models: on a shared 2-core machine two OpenMP threads stall
    each other (steps seen 15x slower), one thread runs steadily. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
