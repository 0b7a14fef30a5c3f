"""A two-turn chat about a long document through one LazyCache: the second turn's TTFT.

    python examples/multi_turn_chat.py [--schedule default] [--model PATH]

Turn 1 asks about examples/long_document.txt (~2,000 tokens). Turn 2 asks a follow-up. With the
cache kept from turn 1, turn 2 prefills only its new tokens (pruned document tokens it needs are
revived); without it, the whole conversation is prefilled again. The script times both.
"""

import argparse
from pathlib import Path

from lazyllm_mlx import load, make_lazy_cache, stream_generate

DOCUMENT = Path(__file__).with_name("long_document.txt").read_text(encoding="utf-8")
FOLLOW_UP = "In which year did the railway reach the town? Answer in one sentence."


def turn(model, tokenizer, tokens, cache, schedule, max_tokens=40):
    """Generate from `tokens` (the new part of the conversation); returns (text, ids, TTFT)."""
    text, ids = "", []
    for r in stream_generate(
        model, tokenizer, tokens, max_tokens=max_tokens, lazy=schedule, prompt_cache=cache
    ):
        text, ids = text + r.text, ids + [r.token]
    return text.strip(), ids, r.ttft


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--schedule", default="default", help="a preset or schedule string")
    args = parser.parse_args()
    model, tokenizer = load(args.model)
    template = tokenizer.apply_chat_template
    turn(model, tokenizer, template([{"role": "user", "content": "Hi"}]), None, args.schedule, 2)

    # Turn 1: the document and its question, through a cache we keep for the conversation.
    messages = [{"role": "user", "content": DOCUMENT}]
    first = template(messages, add_generation_prompt=True)
    cache = make_lazy_cache(model, args.schedule)
    reply, reply_ids, ttft1 = turn(model, tokenizer, first, cache, args.schedule)
    held = first + reply_ids  # what the cache holds now (the prompt and every generated token)
    print(f"turn 1 ({len(first)} tokens, TTFT {ttft1:.2f} s): {reply}")

    # Turn 2: template the whole conversation, keep the prefix the cache holds, prefill the rest.
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": FOLLOW_UP}]
    whole = template(messages, add_generation_prompt=True)
    shared = next((i for i, (a, b) in enumerate(zip(held, whole)) if a != b), len(held))
    cache.trim(cache.offset - shared)  # usually nothing: the template re-renders turn 1 as cached
    reused, reused_ids, ttft_reused = turn(model, tokenizer, whole[shared:], cache, args.schedule)
    print(f"turn 2 with the cache: {len(whole) - shared} new tokens, TTFT {ttft_reused:.2f} s")
    print(f"  {reused}")

    # The same turn 2 without the cache: the whole conversation prefilled from scratch.
    fresh, fresh_ids, ttft_fresh = turn(model, tokenizer, whole, None, args.schedule)
    print(f"turn 2 from scratch: {len(whole)} tokens, TTFT {ttft_fresh:.2f} s")
    print(f"  {fresh}")
    print(f"\nsecond-turn TTFT: x{ttft_fresh / ttft_reused:.1f} faster with the cache")
    print("answers identical" if reused_ids == fresh_ids else "answers differ (pruning differs)")


if __name__ == "__main__":
    main()
