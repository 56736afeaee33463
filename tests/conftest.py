"""Shared fixtures: offline hub, and tiny VLM folders built once per session.

Usage in a test::

    def test_something(tiny_model_dir):
        folder = tiny_model_dir("qwen2_5_vl")          # Path, built on first use
        loaded = load_model(ModelConfig(model=str(folder)))

    @pytest.mark.parametrize("family", FAMILIES)        # from tests.tiny_models
    def test_each(tiny_model_dir, family): ...

The folders are shared by every test in the session: do not write into them (copy the
folder first if a test needs to change files).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.tiny_models import build_tiny_model

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def pytest_configure(config: pytest.Config) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported (during test
    # collection), so the variables must be set before that, not only in a fixture.
    os.environ.update(OFFLINE_ENV)


@pytest.fixture(scope="session", autouse=True)
def offline_hub() -> Iterator[None]:
    """Every test runs with the hub offline: nothing may be downloaded.

    Also flips huggingface_hub's flag, in case it was imported before `pytest_configure`.
    """
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE_ENV.items():
            mp.setenv(key, value)
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread: on the 2-core machines, with another process
    busy, two intra-op threads made this suite ~5x slower (76 s vs 16 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: `tiny_model_dir(family) -> Path` of a saved tiny model (cached per session)."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model(family, root / family)
        return built[family]

    return get
