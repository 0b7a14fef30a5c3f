"""The one place that uses a private mlx-lm API, so a change there is fixed here alone.

`mlx_lm.utils._get_classes` maps a config's model_type (with mlx-lm's remappings) to its
(Model, ModelArgs) classes; mlx-lm has no public way to build a model from a config dict.
"""

from __future__ import annotations

from typing import Any

import mlx.nn as nn
from mlx_lm.utils import _get_classes


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """An mlx-lm model of `config`'s family with freshly initialised weights."""
    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def model_class(config: dict[str, Any]) -> type[nn.Module]:
    """The mlx-lm Model class of `config`'s family (ValueError for a family mlx-lm lacks)."""
    return _get_classes(config)[0]
