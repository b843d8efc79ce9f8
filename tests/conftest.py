"""Fixtures every test module may use: tiny random model folders of each kind, built once per session
(offline, into pytest's temporary directory). Shared helpers that are not fixtures live beside this file:
``engine_driver.py``, ``ar_engine_helpers.py``, ``diffusion_engine_helpers.py``, ``integration/server.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.tiny_diffusion import build_tiny_digits
from tests.fixtures.tiny_models import build_tiny_llama
from tests.fixtures.tiny_text_diffusion import build_tiny_mdlm


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a chat template and a 4096-token context."""
    return build_tiny_llama(tmp_path_factory.mktemp("shared-llama") / "tiny", seed=6, max_positions=4096)


@pytest.fixture(scope="session")
def tiny_digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny class-conditional UNet whose labels are "zero" .. "nine", with a null class."""
    return build_tiny_digits(tmp_path_factory.mktemp("shared-digits") / "digits")


@pytest.fixture(scope="session")
def tiny_mdlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny masked-diffusion text model on the bundled tokenizer plus [MASK]."""
    return build_tiny_mdlm(tmp_path_factory.mktemp("shared-mdlm") / "mdlm")
