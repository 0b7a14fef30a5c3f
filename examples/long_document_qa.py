"""Question answering over a long document: plain mlx-lm vs LazyLLM, time to first token.

    python examples/long_document_qa.py [--schedule default] [--runs 3] [--model PATH]

The document (examples/long_document.txt, ~2,000 tokens) ends with its question. Both runs see the
same chat-templated prompt; the script prints each answer, the median TTFT of each and the speed-up.
"""

import argparse
import statistics
from pathlib import Path

from lazyllm_mlx import LazyConfig, load, stream_generate

DOCUMENT = Path(__file__).with_name("long_document.txt")


def answer(model, tokenizer, prompt, lazy, max_tokens):
    """One generation: (text, TTFT in seconds, the last response for its stats)."""
    text = ""
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, lazy=lazy):
        text += r.text
    return text.strip(), r.ttft, r


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--schedule", default="default", help="a preset or schedule string")
    parser.add_argument("--runs", type=int, default=1, help="timed runs per side (median)")
    parser.add_argument("--max-tokens", type=int, default=40)
    args = parser.parse_args()

    model, tokenizer = load(args.model)
    lazy = LazyConfig.parse(args.schedule)
    messages = [{"role": "user", "content": DOCUMENT.read_text(encoding="utf-8")}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    print(f"prompt: {len(prompt)} tokens, schedule: {args.schedule}")

    for side in (None, lazy):  # warm-up: one-time costs (allocation, kernels) off the clock
        answer(model, tokenizer, prompt[:64], side, 2)

    results = {}
    for name, side in (("mlx-lm", None), ("LazyLLM", lazy)):
        runs = [answer(model, tokenizer, prompt, side, args.max_tokens) for _ in range(args.runs)]
        text, _, last = runs[-1]
        results[name] = statistics.median(ttft for _, ttft, _ in runs)
        print(f"\n--- {name}: TTFT {results[name]:.2f} s")
        if last.lazy is not None:
            print(f"    prefill computed {last.lazy.prefill_fraction:.0%} of the token-layers")
        print(text)

    print(f"\nTTFT speed-up: x{results['mlx-lm'] / results['LazyLLM']:.2f}")


if __name__ == "__main__":
    main()
