"""The package's layering: the model (``r1kit.model``, with ``r1kit.config``) is the leaf that training,
quantization, inference and serving build on, and imports none of them; their fast paths are
applied to it from outside. Checked twice: a scan of every import statement in the model's files
(lazy ones inside functions included), and a fresh interpreter in which the upper packages cannot
be imported at all, importing every model module and running a model."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import r1kit.model

APPLIED = ("r1kit.apps", "r1kit.reason", "r1kit.claims", "r1kit.plan", "r1kit.cli")  # what drives or reads the stages, top down
UPPER = ("r1kit.fused", "r1kit.train", "r1kit.quant", "r1kit.infer", "r1kit.serve", "r1kit.data", "r1kit.checkpoints", *APPLIED)
SRC = Path(r1kit.model.__file__).parents[1]
MODEL_DIR = SRC / "model"
LEAF_FILES = sorted(MODEL_DIR.glob("*.py")) + [SRC / "config.py"]
# each package and the packages above it that it must never import
NEVER = {
    **{f"r1kit.{p}": APPLIED + ("r1kit.serve",) for p in ("data", "train", "quant", "checkpoints", "infer")},
    "r1kit.serve": APPLIED[1:],  # apps mount on the server from the command line, never the other way
    "r1kit.apps": ("r1kit.claims", "r1kit.cli"),
    "r1kit.reason": ("r1kit.apps", "r1kit.claims", "r1kit.cli"),
    "r1kit.claims": ("r1kit.cli",),
    "r1kit.plan": ("r1kit.serve", "r1kit.apps", "r1kit.reason", "r1kit.claims", "r1kit.cli"),  # it reads configs, it runs nothing
    # the fused kernels sit just above the model: the stages apply them, they drive no stage
    "r1kit.fused": UPPER[1:],
}


def upward_imports(path: Path, upper: tuple[str, ...] = UPPER) -> list[str]:
    """``line: module`` for each import of an upper package anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [f"{node.lineno}: {name}" for name in names if any(name == up or name.startswith(up + ".") for up in upper)][:1]
    return found


@pytest.mark.parametrize("path", LEAF_FILES, ids=lambda p: p.name)
def test_no_model_file_imports_an_upper_package(path):
    assert upward_imports(path) == [], f"{path.name} imports an upper package"


@pytest.mark.parametrize("package", sorted(NEVER))
def test_no_stage_imports_what_is_built_on_it(package):
    folder = SRC / package.removeprefix("r1kit.")
    files = sorted(folder.rglob("*.py")) if folder.is_dir() else []
    found = {str(f.relative_to(SRC)): hits for f in files if (hits := upward_imports(f, NEVER[package]))}
    assert found == {}, f"{package} imports a package built on it"


def test_the_scan_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import torch\n\ndef load():\n    from r1kit.quant.checkpoint import load_quantized\n    import r1kit.infer\n")
    assert upward_imports(f) == ["4: r1kit.quant.checkpoint", "5: r1kit.infer"]


BLOCKED_RUN = f"""
import importlib, importlib.abc, pkgutil, sys

UPPER = {UPPER!r}


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == up or name.startswith(up + ".") for up in UPPER):
            raise ImportError(f"the model imported {{name}}")
        return None


sys.meta_path.insert(0, Block())
import r1kit.model
for info in pkgutil.walk_packages(r1kit.model.__path__, "r1kit.model."):
    importlib.import_module(info.name)

import torch
from r1kit.config import ModelConfig
from r1kit.model import ContiguousKVCache, R1kitForCausalLM

cfg = ModelConfig(vocab_size=61, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=48, local_window=4,
                  attention=["global", "local", "hybrid"], ffn=["dense", "topk", "dense"])
model = R1kitForCausalLM(cfg)
tokens = torch.randint(0, 61, (2, 9))
model(tokens).logsumexp(-1).mean().backward()
model.eval()
with torch.no_grad():
    full = model(tokens)
    cache = ContiguousKVCache(cfg, window=4)
    steps = torch.cat([model(tokens[:, :5], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache) for i in range(5, 9)], dim=1)
torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
print("ok", sorted(m for m in sys.modules if m.startswith("r1kit.")))
"""


def test_the_model_imports_and_runs_without_the_upper_packages():
    r = subprocess.run([sys.executable, "-c", BLOCKED_RUN], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok")
