"""`python -m lazyllm_mlx.cli <command>`, the same as `lazyllm-mlx <command>`."""

import sys

from . import main

sys.exit(main())
