"""r1kit's errors carry the setting or request field they are about, as ``param``."""

import pickle

import pytest
import torch

from r1kit.device import DTYPE_CHOICES, DTYPES, resolve_dtype
from r1kit.errors import CheckpointError, ConfigError, R1kitError


def test_param_is_optional_and_survives_pickling():
    assert ConfigError("plain message").param is None and str(CheckpointError("m")) == "m"
    error = pickle.loads(pickle.dumps(ConfigError("top_p=2 must be in (0, 1]", param="top_p")))
    assert isinstance(error, R1kitError) and error.param == "top_p" and str(error) == "top_p=2 must be in (0, 1]"


def test_resolve_dtype():
    assert resolve_dtype("auto") is None and resolve_dtype(None) is None
    assert resolve_dtype(torch.float16) is torch.float16
    assert {name: resolve_dtype(name) for name in DTYPES} == DTYPES and DTYPE_CHOICES[0] == "auto"
    with pytest.raises(ConfigError, match=r"--dtype='fp8' must be one of \['auto', 'float32'") as info:
        resolve_dtype("fp8", "--dtype")
    assert info.value.param == "--dtype"
