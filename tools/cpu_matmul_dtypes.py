"""Why the CPU runs float32: one of Qwen2.5-1.5B's MLP products in each weight format MLX offers.

    python tools/cpu_matmul_dtypes.py --json matmul_dtypes.json

Times (min of --repeats, after a warm-up) an (N × 1536) by (1536 × 8960) product for N = 2048 and
512 (prefill chunks) and 1 (a decode step), with float32, bfloat16 and float16 operands and with
4-bit affine-quantized weights (group 64, float32 activations), as `lazyllm_mlx` loads MLX: with
OpenBLAS preloaded on Linux.
"""

from __future__ import annotations

import argparse
import time

import lazyllm_mlx  # noqa: F401  (before mlx: OpenBLAS preload)
from lazyllm_mlx.output_files import write_json

import mlx.core as mx

ROWS = (2048, 512, 1)
IN_FEATURES, OUT_FEATURES = 1536, 8960


def fastest(fn, repeats: int) -> float:
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def measure(rows: int, repeats: int) -> dict[str, float]:
    """Seconds per product for each weight format."""
    x = mx.random.normal((rows, IN_FEATURES))
    w = mx.random.normal((OUT_FEATURES, IN_FEATURES))
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    mx.eval(x, w, wq, scales, biases)
    seconds = {}
    for dtype in (mx.float32, mx.bfloat16, mx.float16):
        xd, wd = x.astype(dtype), w.astype(dtype)
        mx.eval(xd, wd)
        seconds[str(dtype).rsplit(".", 1)[-1]] = fastest(lambda a=xd, b=wd: a @ b.T, repeats)
    seconds["q4"] = fastest(
        lambda: mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=64, bits=4),
        repeats,
    )
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args()
    table = {rows: measure(rows, args.repeats) for rows in ROWS}
    formats = list(table[ROWS[0]])
    print(f"{'rows':>6}" + "".join(f"{f + ' ms':>13}{'÷ f32':>7}" for f in formats))
    for rows, seconds in table.items():
        cells = "".join(
            f"{1000 * seconds[f]:>13.1f}{seconds[f] / seconds['float32']:>7.1f}" for f in formats
        )
        print(f"{rows:>6}{cells}")
    if args.json:
        report = {
            "command": "python tools/cpu_matmul_dtypes.py "
            f"--repeats {args.repeats} --json {args.json}",
            "device": str(mx.default_device()),
            "shape": [IN_FEATURES, OUT_FEATURES],
            "repeats": args.repeats,
            "seconds": {str(rows): seconds for rows, seconds in table.items()},
        }
        write_json(args.json, report, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
