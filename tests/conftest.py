import pytest
import torch

from r1kit.config import ModelConfig


@pytest.fixture
def tiny_config():
    """A few-thousand-parameter config; tests override fields with dataclasses.replace or kwargs."""

    def make(**overrides):
        base = dict(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48, local_window=4)
        base.update(overrides)
        return ModelConfig(**base)

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # The tests' models are tiny: one thread avoids OpenMP spin-waits that stall small ops on a busy 2-core machine.
    torch.set_num_threads(1)
