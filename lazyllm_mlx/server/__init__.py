"""`lazyllm-mlx serve`: an OpenAI-compatible HTTP server over one model, with LazyLLM prefill.

- `http`: the endpoints, on stdlib's ThreadingHTTPServer;
- `protocol`: OpenAI-style requests and responses (parsing, validation, JSON shapes);
- `service`: what a request runs: prompt tokens, schedule, cache reuse, stop strings, the lock;
- `prompt_caches`: the caches kept between requests, one per schedule.
"""

from .http import make_server
from .service import GenerationService

__all__ = ["GenerationService", "make_server"]
