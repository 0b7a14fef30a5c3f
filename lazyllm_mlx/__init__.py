"""LazyLLM token pruning for mlx-lm models."""

from ._platform import preload_openblas

preload_openblas()  # must run before mlx.core is imported anywhere below

__version__ = "0.1.0"

from .cache import LazyCache  # noqa: E402
from .calibrate import CalibrateOptions, calibrate  # noqa: E402
from .config import LazyConfig  # noqa: E402
from .convert import convert  # noqa: E402
from .generate import (  # noqa: E402
    GenerationResponse,
    default_schedule,
    generate,
    generate_step,
    make_lazy_cache,
    stream_generate,
)
from .loading import load  # noqa: E402
from .prompt_cache import load_lazy_cache, save_lazy_cache  # noqa: E402
from .stats import LazyStats  # noqa: E402

__all__ = [
    "CalibrateOptions",
    "GenerationResponse",
    "LazyCache",
    "LazyConfig",
    "LazyStats",
    "calibrate",
    "convert",
    "default_schedule",
    "generate",
    "generate_step",
    "load",
    "load_lazy_cache",
    "make_lazy_cache",
    "save_lazy_cache",
    "stream_generate",
]
