"""Test setup: the ``one_thread`` fixture for test modules that train small models. (The repo
root is importable through pytest.ini's ``pythonpath``; shared test code lives in
tests/oracles.py and tests/cast_paths.py.)"""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for tiny models: on a shared 2-core machine two OpenMP threads stall
    each other (steps seen 15x slower), one thread runs steadily. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
