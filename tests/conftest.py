"""Shared fixtures. Tests run on CPU, deterministic, and skip with a reason where ../shared is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"

# Offline tokenizer: tiktoken reads its BPE files from here when set.
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")

# Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of the cores: more torch
# threads than cores make OpenMP threads wait for each other.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session", autouse=True)
def _compile_cache(tmp_path_factory) -> None:
    """Compiled decoding pieces (`gpt2.decode.compiled`) go to a folder of this session, not the user's cache, and are
    shared by its tests (child processes inherit it)."""
    base = tmp_path_factory.getbasetemp()
    # xdist workers share one folder (their base folders' parent) so a piece is compiled once per run; the cache's
    # lock makes concurrent builders wait for one another.
    folder = base.parent / "compiled" if "PYTEST_XDIST_WORKER" in os.environ else base / "compiled"
    folder.mkdir(exist_ok=True)
    os.environ["GPT2_COMPILE_CACHE"] = str(folder)


def _tokenizer_available() -> bool:
    try:
        import tiktoken

        tiktoken.get_encoding("gpt2")
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def tokenizer_ok() -> None:
    if not _tokenizer_available():
        pytest.skip("GPT-2 tokenizer unavailable offline: set TIKTOKEN_CACHE_DIR (../shared/tiktoken_cache)")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models gain nothing from a second one, and on a busy machine OpenMP
    threads waiting for each other make steps several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
