"""`calibrate`: measure where a model retrieves, choose its schedules, verify them, store them.

1. Probe (evals.probe): one plain forward pass per needle prompt (passkey, key-value,
   multi-document) ranks the tokens at every layer with the window rule; the recall of the answer
   tokens at each layer and keep says what a cut there would keep.
2. Choose: the layout of one to three cuts with the smallest prefill fraction at the probe
   length whose every cut keeps at least `target` of the answer tokens, each later cut keeping
   less. Where the first cut's layer ranks the answer sharply (into a keep of at most
   SHARP_KEEP), the cut keeps a token budget (its keep times the probe length), so the kept share
   falls as prompts grow; where it needs more, a share of every prompt. Later cuts keep a share of
   what reaches them. Decoding revives with a margin of 0.5, as every shipped calibration does.
3. Verify on other prompts, code completion among them, against the baseline: no answer the
   baseline gets right may get worse, nor its first token change. A failure backs off to a rung
   that keeps more (one cut fewer, every cut keeping 1.5 or 2 times more, then one cut keeping a
   share at every length), saying so; when none holds, nothing is stored.
4. Decoding (calibrate_decoding): the schedule that holds, with and without `every=`, is timed
   against the baseline over a short answer; `every=` is kept when clearly faster and verified.

The cost is `probe_prompts` x 3 baseline prefills, `verify_prompts` x 4 baseline generations
(kept in a baseline cache, so a rerun skips them) and as many lazy ones per rung tried, then
`decode_rounds` x 3 short generations (one of them the baseline's) and, when `every=` is faster,
one more verification round.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .calibrate_decoding import choose_every
from .calibration_store import Calibration, fingerprint, save_to_store, store_dir
from .config import WINDOW_RULE_TEXT, LazyConfig
from .evals.baselines import BaselineStore
from .evals.probe import PROBE_TASKS, probe, rule_options
from .evals.run import SOLVED, evaluate
from .evals.scores import by_prompt
from .evals.tasks import TASKS
from .families import architecture_of, check_supported, family_of, model_type_of
from .generate import context_length
from .output_files import write_json

DECODING = "margin=0.5;min=256"
KEEPS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
# A layer that keeps the answer only when it keeps more than this share of the prompt is not
# ranking it (SmolLM2's layer 1 keeps 95 % of the answer tokens at keep 0.9): it is no place to cut.
MAX_FIRST_KEEP = 0.5
BUDGET_STEP = 128  # budgets are whole multiples of this many tokens
# A first cut keeps a fixed budget of tokens only where its layer ranks the answer into this share
# or less: Qwen2.5-1.5B's layer 2 needs 40 % at 2K, and a budget there lost a passkey at 16K
# that Gemma's budget after a layer needing 15 % keeps (BENCHMARKS.md, "Long prompts").
SHARP_KEEP = 0.25
SAFE_KEEP = 0.6  # the last rung: one cut at the first retrieving layer, keeping this share
# Rungs between the probe's layout and that share: every cut keeping this many times more.
WIDER = (1.5, 2.0)
MOST = 0.95  # a candidate computing this share of the token-layers or more is not worth verifying
SIZES = (2048, 8192, 32768)  # prompt lengths the expected prefill fraction is reported at


@dataclass
class CalibrateOptions:
    """How much to measure. The defaults cost ~12 + 8 baseline prefills of `length` tokens."""

    length: int = 2048
    probe_prompts: int = 4  # per probe task (3 tasks)
    verify_prompts: int = 2  # per eval task (4 tasks), other prompts than the probe's
    target: float = 0.95  # mean recall of the answer tokens every cut must reach
    seed: int = 0
    max_cuts: int = 3
    decode_rounds: int = 3  # timed rounds deciding `every=` (0: not timed, every step selects)


def calibrate(
    model: Any,
    tokenizer: Any,
    options: CalibrateOptions | None = None,
    *,
    label: str = "",
    command: str = "",
    baselines: BaselineStore | None = None,
    progress: Callable[[str], None] | None = None,
    say: Callable[[str], None] = lambda _: None,
    save: bool = True,
) -> Calibration:
    """Measure, choose and verify `model`'s schedules and (with `save`) store them in the user's
    store, where every later load of this model finds them; returns the Calibration.
    progress: called once per forward pass or generation done; say: one line per decision."""
    options = options or CalibrateOptions()
    start = time.perf_counter()
    check_supported(model_type_of(model))  # before any work
    if options.length < 256 or options.probe_prompts < 1 or options.verify_prompts < 1:
        raise ValueError("calibrate needs a length of at least 256 tokens and 1+ prompts each")
    if options.decode_rounds < 0:
        raise ValueError(f"decode_rounds must be 0 or more, not {options.decode_rounds}")
    limit = context_length(model)
    if limit is not None and options.length > limit:
        raise ValueError(f"--length {options.length} is longer than the model's context ({limit})")
    if baselines is None:
        baselines = BaselineStore(store_dir() / "baselines", model)
    tick = progress or (lambda _: None)
    report = probe_once(model, tokenizer, options, tick)
    recall = {(r["layer"], r["keep"]): r["mean"] for r in report["rows"]}
    num_layers = family_of(model).num_layers
    ladder = back_off_ladder(recall, num_layers, options)
    if not ladder:
        raise ValueError(
            f"no layer keeps {options.target:.0%} of the answer tokens even at keep "
            f"{max(KEEPS):g}: this model is not one to prune (the generic layout stays)"
        )
    prompts = options.probe_prompts * len(PROBE_TASKS)
    say(f"probe: {len(report['rows']) // len(KEEPS)} layers ranked on {prompts} prompts; "
        "candidates, cheapest first:")  # fmt: skip
    for text in ladder:
        say(f"  {text}  ({expected_fraction(text, num_layers, options.length):.1%} at "
            f"{options.length} tokens)")  # fmt: skip
    rungs = verify_ladder(model, tokenizer, ladder, options, baselines, tick, say)
    chosen = len(rungs) - 1
    if rungs[chosen]["verdict"] is not None:
        raise ValueError(
            "no candidate kept the baseline's answers on the verification prompts, so nothing "
            "is stored and the generic layout stays; a rerun with --length nearer your prompts "
            "or a higher --target reuses the probe and the baselines"
        )
    default, decoding = choose_decoding(model, tokenizer, ladder[chosen], options, baselines,
                                        tick, say)  # fmt: skip
    schedules = {"default": default, "safe": ladder[min(chosen + 1, len(ladder) - 1)]}
    calibration = Calibration(
        fingerprint=fingerprint(model),
        architecture=tuple(architecture_of(model)),
        schedules=schedules,
        model=label,
        command=command,
        created=datetime.datetime.now().isoformat(timespec="seconds"),
        evidence=dict(
            options=vars(options),
            probe={f"{layer}:{keep:g}": round(value, 4) for (layer, keep), value in recall.items()},
            rungs=rungs,
            decoding=decoding,
            seconds=round(time.perf_counter() - start, 1),
            expected_prefill_fraction={
                name: {n: round(expected_fraction(text, num_layers, n), 4) for n in SIZES}
                for name, text in schedules.items()
            },
        ),
    )
    if save:
        save_to_store(calibration, model)
    return calibration


def probe_once(
    model: Any, tokenizer: Any, options: CalibrateOptions, tick: Callable[[str], None]
) -> dict[str, Any]:
    """The probe's report, kept in the store beside the baselines: a rerun (after an
    interruption, or with other verification settings) does not probe again."""
    key = f"{fingerprint(model)}-{options.length}-{options.probe_prompts}-{options.seed}.json"
    path = store_dir() / "probes" / key
    rule = LazyConfig.parse(f"none;{WINDOW_RULE_TEXT}")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        if report["keeps"] == list(KEEPS) and report["rules"] == [rule_options(rule)]:
            for _ in range(len(PROBE_TASKS) * options.probe_prompts):
                tick("probe: kept from an earlier run")
            return report
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none kept, or damaged: probe anew
    report = probe(model, tokenizer, [rule], length=options.length, num=options.probe_prompts,
                   keeps=list(KEEPS), seed=options.seed, log=tick)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, report)
    return report


def verify_ladder(
    model: Any,
    tokenizer: Any,
    ladder: list[str],
    options: CalibrateOptions,
    baselines: BaselineStore,
    tick: Callable[[str], None],
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Verify the candidates in order up to the first that holds; each one's evidence."""
    rungs = []
    for i, text in enumerate(ladder):
        summary = verify(model, tokenizer, text, options, baselines, tick)
        rungs.append(_rung(text, summary))
        verdict = rungs[-1]["verdict"]
        say(f"verify {text}: {verdict or 'holds'} ({_line(summary)})")
        if verdict is None:
            break
        if i + 1 < len(ladder):
            say("  backing off to a schedule that keeps more")
    return rungs


def choose_decoding(
    model: Any,
    tokenizer: Any,
    text: str,
    options: CalibrateOptions,
    baselines: BaselineStore,
    tick: Callable[[str], None],
    say: Callable[[str], None],
) -> tuple[str, dict[str, Any] | None]:
    """`text` with the decoding options timing and verification chose, and their evidence."""
    if not options.decode_rounds:
        return text, None

    def holds(candidate: str) -> dict[str, Any]:
        return _rung(candidate, verify(model, tokenizer, candidate, options, baselines, tick))

    return choose_every(model, tokenizer, text, options.length, options.decode_rounds, holds,
                        tick, say)  # fmt: skip


def back_off_ladder(
    recall: dict[tuple[int, float], float], num_layers: int, options: CalibrateOptions
) -> list[str]:
    """Schedules to verify, cheapest first: the layout the probe allows and the same with one
    cut fewer, each also with every cut keeping WIDER times more (the first cut a budget of
    tokens where its layer ranks sharply, else a share); then one cut keeping a share (twice the
    probe's, at least SAFE_KEEP) at every length. None that would compute nearly everything at
    the probe length."""
    best = cheapest_layout(recall, num_layers, options)
    if best is None:
        return []
    (first, keep), *later = best
    candidates = []
    for wider in (1.0, *WIDER):
        size = _budget(keep * wider, options.length) if keep <= SHARP_KEEP else _share(keep * wider)
        candidates.append(_text((first, size), later, keep))
        candidates.append(_text((first, size), later[:-1], keep))  # one cut fewer
    candidates.append(_text((first, max(SAFE_KEEP, 2 * keep)), [], keep))  # a share, not a budget
    fraction = {c: expected_fraction(c, num_layers, options.length) for c in candidates}
    pruning = [c for c in dict.fromkeys(candidates) if fraction[c] < MOST]
    return sorted(pruning, key=fraction.get)


def cheapest_layout(
    recall: dict[tuple[int, float], float], num_layers: int, options: CalibrateOptions
) -> list[tuple[int, float]] | None:
    """The cuts [(boundary, keep of all tokens), ...], each keeping less than the one before,
    of least prefill fraction at the probe length such that the layer before each boundary
    ranks `target` of the answer tokens into its keep (at most MAX_FIRST_KEEP); None if no
    single cut does."""
    good = sorted((layer + 1, keep) for (layer, keep), r in recall.items()
                  if r >= options.target and layer + 1 < num_layers
                  and keep <= MAX_FIRST_KEEP)  # fmt: skip

    @functools.cache
    def rest(b: int, keep: float, cuts_left: int) -> tuple[float, tuple]:
        """Least token-layers from boundary b on (keeping `keep`), and the later cuts."""
        best = (keep * (num_layers - b), ())
        if cuts_left:
            for b2, k2 in good:
                if b2 > b and k2 < keep:
                    work, after = rest(b2, k2, cuts_left - 1)
                    if keep * (b2 - b) + work < best[0] - 1e-9:
                        best = (keep * (b2 - b) + work, ((b2, k2), *after))
        return best

    if not good:
        return None
    _, first = min((b + rest(b, k, options.max_cuts - 1)[0], (b, k)) for b, k in good)
    return [first, *rest(*first, options.max_cuts - 1)[1]]


def _budget(keep: float, length: int) -> int:
    """A first cut's keep at the probe length, as tokens: up to a whole number of steps."""
    return max(BUDGET_STEP, BUDGET_STEP * math.ceil(min(keep, 1.0) * length / BUDGET_STEP))


def _share(keep: float) -> float:
    """A first cut's keep as a share of every prompt: up to a hundredth, at most everything."""
    return min(1.0, math.ceil(100 * keep - 1e-6) / 100)


def _text(first: tuple[int, float], later: list[tuple[int, float]], keep: float) -> str:
    """A schedule string: the first cut as given (a budget or a share), each later cut keeping
    its share of all tokens relative to the cut before it, rounded up to a hundredth."""
    cuts, before = [first], keep
    for b, k in later:
        cuts.append((b, min(1.0, math.ceil(100 * k / before - 1e-6) / 100)))
        before = k
    layout = ",".join(f"{b}:{k:g}" for b, k in cuts)
    return f"{layout};{DECODING};{WINDOW_RULE_TEXT}"


def expected_fraction(text: str, num_layers: int, num_tokens: int) -> float:
    """The prefill fraction `text` computes on a fresh `num_tokens`-token prompt."""
    config = LazyConfig.parse(text)
    if num_tokens < config.min_prompt_tokens:
        return 1.0
    return config.resolve(num_layers).prefill_fraction(num_tokens)


def verify(
    model: Any,
    tokenizer: Any,
    text: str,
    options: CalibrateOptions,
    baselines: BaselineStore,
    tick: Callable[[str], None],
) -> dict[str, Any]:
    """The eval's summary of `text` on prompts the probe did not see, each record carrying the
    baseline's score on its prompt as `base_score`."""
    report = evaluate(
        model, tokenizer, schedules=[text], lengths=[options.length], tasks=list(TASKS),
        num=options.verify_prompts, seed=options.seed + 1, first_prompt=options.probe_prompts,
        references=False, include_none=False, log=tick, baselines=baselines,
    )  # fmt: skip
    base = next(r for r in report["results"] if r["family"] == "baseline")
    summary = next(r for r in report["results"] if r["family"] == "lazy")
    base_scores = {key: r["score"] for key, r in by_prompt(base["instances"]).items()}
    for key, record in by_prompt(summary["instances"]).items():
        record["base_score"] = base_scores[key]
    return summary


def verdict_of(summary: dict[str, Any]) -> str | None:
    """None when the schedule holds: every prompt the baseline solves is answered as well
    (within 0.1 of its score) and starts with the baseline's first token; else why not."""
    lost = [r for r in summary["instances"] if r["base_score"] >= SOLVED
            and r["score"] < r["base_score"] - 0.1]  # fmt: skip
    changed = [
        r for r in summary["instances"] if r["base_score"] >= SOLVED and not r["first_token"]
    ]
    if lost:
        names = ", ".join(f"{r['task']}#{r['index']}" for r in lost)
        return f"fails: {len(lost)} answer(s) the baseline gets right got worse ({names})"
    if changed:
        return f"fails: the first token changed on {len(changed)} prompt(s) the baseline solves"
    return None


def _rung(text: str, summary: dict[str, Any]) -> dict[str, Any]:
    """A verified candidate's record: the schedule, its verdict and the evidence behind it."""
    return dict(schedule=text, verdict=verdict_of(summary), **_evidence(summary))


def _evidence(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy_delta", "accuracy_delta_se", "first_token", "first_token_where_right",
            "kl", "continuation", "prefill_fraction", "ttft_speedup", "scores")  # fmt: skip
    evidence = {k: summary[k] for k in keys}
    evidence["prompts"] = len(summary["instances"])
    return evidence


def _line(summary: dict[str, Any]) -> str:
    right = summary["first_token_where_right"]
    right = "n/a" if right is None else f"{right:.0%}"
    return (f"{len(summary['instances'])} prompts, Δ {summary['accuracy_delta']:+.1f} ± "
            f"{summary['accuracy_delta_se']:.1f} points, first token {right} where right, KL "
            f"{summary['kl']:.3f}, prefill {summary['prefill_fraction']:.1%}")  # fmt: skip
