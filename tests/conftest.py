import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lazyllm_mlx  # noqa: E402,F401  (preloads OpenBLAS before anything imports mlx)
