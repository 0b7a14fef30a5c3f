import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# The tests' GGUF files stay out of the user's cache folder (test_gguf_load_cache turns it on).
os.environ["LAZYLLM_MLX_GGUF_CACHE"] = "0"
# Nor do they read or write the user's calibration store (tests that need one set their own).
os.environ["LAZYLLM_MLX_CALIBRATIONS"] = tempfile.mkdtemp(prefix="lazyllm-calibrations-")

import lazyllm_mlx  # noqa: E402  (preloads OpenBLAS before anything imports mlx)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The real default model, (model, tokenizer, config); tools/setup.sh installs it."""
    return lazyllm_mlx.load(return_config=True)
