import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lazyllm_mlx  # noqa: E402  (preloads OpenBLAS before anything imports mlx)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The real default model, (model, tokenizer, config); tools/setup.sh installs it."""
    return lazyllm_mlx.load(return_config=True)
