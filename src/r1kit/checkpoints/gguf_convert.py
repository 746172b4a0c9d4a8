"""A GGUF file as an r1kit model: loaded directly, converted to a model directory, or seen through a cached view.

Every verb takes a model directory; a ``.gguf`` path becomes one through :func:`gguf_view`: a small
directory in r1kit's cache holding ``config.json``, the tokenizer files rebuilt from the GGUF metadata
(``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``), ``generation_config.json`` and a
pointer to the GGUF, whose weights are read from the file itself at load time (never copied).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from r1kit.checkpoints.cache import r1kit_home, staging_dir
from r1kit.checkpoints.gguf_read import hf_config, open_gguf, read_weights
from r1kit.config import dump_json

SOURCE_FILE = "gguf_source.json"  # in a view directory: {"path": the GGUF whose weights it stands for}


def write_side_files(reader, folder: Path, where: str) -> None:
    """``config.json``, ``generation_config.json`` and the tokenizer files of a GGUF into ``folder``."""
    from r1kit.checkpoints.gguf_tokenizer import tokenizer_from_gguf

    config = hf_config(reader, where)
    dump_json(config, folder / "config.json")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    dump_json(generation, folder / "generation_config.json")
    tokenizer_from_gguf(reader).save(folder)


def load_gguf_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", reader=None):
    """The r1kit model of a llama/qwen2 GGUF, weights dequantized (float32 unless ``dtype`` says otherwise);
    ``reader``: the file already opened with :func:`open_gguf`."""
    from r1kit.model.hf import config_from_hf, model_from_state

    reader = reader if reader is not None else open_gguf(path)
    raw = hf_config(reader, str(path))
    state = read_weights(reader, raw, str(path))
    return model_from_state(config_from_hf(raw, where=str(path)), state, Path(path), dtype or torch.float32, device)


def convert_gguf(path: str | Path, out: str | Path) -> Path:
    """Write a GGUF as a self-contained r1kit/Hugging Face model directory (float32 safetensors)."""
    from r1kit.model.hf import save_model

    path, out = Path(path), Path(out)
    with staging_dir(out) as tmp:
        reader = open_gguf(path)
        write_side_files(reader, tmp, str(path))
        save_model(load_gguf_model(path, reader=reader), tmp)
    return out


def gguf_view(path: str | Path, home: Path | None = None) -> Path:
    """The cached view directory of a GGUF file (made once per file version)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = (home or r1kit_home()) / "gguf" / f"{path.stem}-{key}"
    if (folder / SOURCE_FILE).is_file():
        return folder
    with staging_dir(folder) as tmp:
        write_side_files(open_gguf(path), tmp, str(path))
        dump_json({"path": str(path)}, tmp / SOURCE_FILE)
    return folder


def view_source(folder: Path) -> Path | None:
    """The GGUF a view directory stands for, or None for an ordinary model directory."""
    pointer = folder / SOURCE_FILE
    if not pointer.is_file():
        return None
    return Path(json.loads(pointer.read_text(encoding="utf-8"))["path"])
