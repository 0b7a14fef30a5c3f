"""Measuring LazyLLM offline: speed (`bench`) and long-context quality (`run` over `tasks` built
from `sources`, graded by `scores`, with the baseline's outcomes reusable from `baselines`), and
the plots of both."""
