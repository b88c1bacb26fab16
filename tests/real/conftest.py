"""The real-model tier: SmolLM2-135M-Instruct, fetched beforehand by tests/real/fetch.py (.ci/run
does it). Nothing here downloads; without the model every test here is skipped, saying why."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fetch import convert, gguf_path  # noqa: E402


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.real)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def real_model() -> Path:
    if not gguf_path().exists():
        pytest.skip(f"the real model is not fetched ({gguf_path()}); run: python tests/real/fetch.py")
    return convert()


@pytest.fixture(scope="session")
def real_gguf(real_model) -> Path:
    return gguf_path()

