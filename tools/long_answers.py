"""Long answers about a long document: what revival buys, and what the whole answer costs.

    python tools/long_answers.py --document examples/long_document.txt --max-tokens 256 \\
        --schedules default 'default;norevive'

For each question (chat template, the document then the question), the baseline and each schedule
answer greedily. Per method: how much of the baseline's answer it reproduces (the common prefix in
tokens, at 64 tokens and at the whole length; and the share of the baseline's word 4-grams it also
says), how many of the numbers it states occur in the document (a wrong number is the typical
fact a pruned context loses: "10 kilometres south" where the text says 40 km north), decode speed
over the first 16 tokens and overall, and the whole request's time. Runs go question by question,
all methods back to back (interleaved), after one warm-up.
"""

from __future__ import annotations

import argparse
import re
import statistics

import lazyllm_mlx  # noqa: F401  (before mlx: OpenBLAS preload)
from lazyllm_mlx import load
from lazyllm_mlx.config import split_schedules
from lazyllm_mlx.evals.measure import generate_once, warm_up
from lazyllm_mlx.generate import for_model
from lazyllm_mlx.output_files import write_json

QUESTIONS = [
    "Describe the history of the Greyholm Point lighthouse in detail.",
    "Summarise the document: the town's location, its history, its harbour and how to visit.",
    "What are the most important numbers in this document (distances, heights, dates, "
    "populations), and what does each measure?",
    "Write a short guide for a first-time visitor, using only facts from the document.",
]
_NUMBER = re.compile(r"\d[\d,.]*\d|\d")


def numbers(text: str) -> list[str]:
    return [n.replace(",", "") for n in _NUMBER.findall(text)]


def ngrams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def decode_tps(times: list[float], first: int | None = None) -> float:
    """Tokens/s after the first token, over the next `first` tokens (None: all)."""
    end = len(times) - 1 if first is None else min(first, len(times) - 1)
    return end / (times[end] - times[0]) if end > 0 else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--document", required=True, help="a long text file")
    parser.add_argument("--schedules", nargs="+", default=["default", "default;norevive"])
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--questions", type=int, default=len(QUESTIONS))
    parser.add_argument("--json", help="write the per-answer figures here")
    args = parser.parse_args()
    model, tokenizer = load(args.model)
    with open(args.document, encoding="utf-8") as f:
        document = f.read()
    in_document = set(numbers(document))
    methods = {"baseline": None} | {s: for_model(s, model) for s in split_schedules(args.schedules)}
    prompts = []
    for question in QUESTIONS[: args.questions]:
        messages = [{"role": "user", "content": f"{document}\n\n{question}"}]
        prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    warm_up(model, tokenizer, prompts[0], methods.values())
    records = []
    for q, prompt in enumerate(prompts):
        base = None
        for name, lazy in methods.items():
            run = generate_once(model, tokenizer, prompt, lazy, max_tokens=args.max_tokens)
            tokens, text = run.generated_tokens, run.text
            base = base or (tokens, text)
            stated = numbers(text)
            record = dict(
                question=q,
                method=name,
                tokens=len(tokens),
                prefix=common_prefix(base[0], tokens),
                prefix_64=common_prefix(base[0][:64], tokens[:64]),
                ngram_recall=len(ngrams(text) & ngrams(base[1])) / max(1, len(ngrams(base[1]))),
                numbers=len(stated),
                numbers_in_document=sum(n in in_document for n in stated),
                ttft=run.last.ttft,
                decode_tps_16=decode_tps(run.token_times, 16),
                decode_tps=decode_tps(run.token_times),
                total=run.total_time,
                text=text,
            )
            records.append(record)
            print(f"[{q + 1}/{len(prompts)}] {name}: {len(tokens)} tokens, prefix "
                  f"{record['prefix']}, numbers {record['numbers_in_document']}/"
                  f"{record['numbers']} in the document, {run.total_time:.1f} s",
                  flush=True)  # fmt: skip
    print(f"\n{len(prompts)} questions, {args.max_tokens} tokens at most, medians over questions")
    head = f"{'method':<34}{'prefix':>7}{'of 64':>7}{'4-grams':>8}{'numbers ok':>11}"
    print(head + f"{'TTFT s':>8}{'dec16 t/s':>10}{'dec t/s':>8}{'total s':>8}{'total ×':>8}")
    base_total = {r["question"]: r["total"] for r in records if r["method"] == "baseline"}
    for name in methods:
        rows = [r for r in records if r["method"] == name]

        def med(key: str, rows=rows) -> float:
            return statistics.median(r[key] for r in rows)

        stated = sum(r["numbers"] for r in rows)
        ok = sum(r["numbers_in_document"] for r in rows) / stated if stated else float("nan")
        speed = statistics.median(base_total[r["question"]] / r["total"] for r in rows)
        print(f"{name[:33]:<34}{med('prefix'):>7.0f}{med('prefix_64'):>7.0f}"
              f"{med('ngram_recall'):>8.0%}{ok:>11.0%}{med('ttft'):>8.2f}"
              f"{med('decode_tps_16'):>10.1f}{med('decode_tps'):>8.1f}{med('total'):>8.1f}"
              f"{speed:>8.2f}")  # fmt: skip
    if args.json:
        write_json(args.json, dict(command=vars(args), records=records), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
