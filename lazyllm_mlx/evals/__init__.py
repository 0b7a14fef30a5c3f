"""Measuring LazyLLM offline: one measured generation and the warm-up (`measure`), speed
(`bench`), long-context quality (`run` over `tasks` built from `sources`, graded by `scores`, the
baseline's outcomes reusable from `baselines`), and the plots of both (`plots`)."""
