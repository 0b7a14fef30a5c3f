"""The long-context tasks of `lazyllm-mlx eval`, built from the standard library at an exact length.

Every prompt has exactly the requested number of tokens: the frame (chat template or plain text,
instruction, question) is tokenized around a body sentinel and the body (filler text with the fact
inserted, or source code) is cut to fill the rest. Seeds are per task, length and instance, so an
instance does not change when `num` does.

- passkey: a pass key sentence inside documentation text, at several depths (number match);
- kv: a table of random word → 4-digit value pairs inside documentation text, one key asked;
- code: the next line of a real stdlib file (edit similarity), chosen among lines that resemble an
  earlier line of the context, so the context matters (a plain random line mostly measures luck).
  In chat the file is the start of the assistant's answer to "show the source of <file>": asked
  to "write the next line", the small chat model writes anything but the next line;
- mdqa: documentation of stdlib functions as documents (name, module, docstring); in which module
  is one of them defined. The answer starts with a cue repeating the document's header
  ("Function: name / Module:"), also in chat: without it SmolLM2-135M never finds the document
  at 1K tokens (0/5 in each of five question forms tried); with it, it sometimes does.
"""

from __future__ import annotations

import bisect
import difflib
import io
import itertools
import random
import tokenize
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .sources import (
    FunctionDoc,
    doc_topics,
    function_docs,
    read_source,
    source_files,
    stdlib_path,
    topic_paragraphs,
    topic_words,
)

TASKS = ("passkey", "kv", "code", "mdqa")
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)  # where the fact sits in the body, cycled over instances
# Decode budget per task: enough for the answer in a chat model's usual phrasing.
MAX_TOKENS = {"passkey": 12, "kv": 16, "code": 16, "mdqa": 12}
MDQA_DOC_CHARS = 600
KV_PAIRS = 16
BODY = "\x00BODY\x00"
MIN_BODY = 32
_STRIDE = 64


@dataclass(frozen=True)
class Task:
    """One prompt of the suite with its answer and how to score it."""

    task: str
    index: int
    tokens: list[int]
    answer: str
    scorer: str  # "number", "contains" or "edit" (see .scores)
    max_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Frame:
    """The texts around the body: a chat turn (user, assistant prefill) and a plain-text form."""

    user: str
    prefill: str
    plain: str


def frame_tokens(tokenizer: Any, frame: Frame, chat: bool) -> tuple[list[int], list[int]]:
    """(head, tail) token lists around the body, rendered through the chat template if `chat`."""
    if chat:
        messages = [{"role": "user", "content": frame.user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text += frame.prefill
    else:
        text = frame.plain
    before, sep, after = text.partition(BODY)
    if not sep:
        raise ValueError("The prompt frame has no body (the chat template dropped the message?)")
    # The template spells its special tokens; plain text gets BOS the tokenizer's usual way.
    head = tokenizer.encode(before, add_special_tokens=not chat)
    tail = tokenizer.encode(after, add_special_tokens=False) if after else []
    return list(head), list(tail)


def body_budget(length: int, head: list[int], tail: list[int]) -> int:
    budget = length - len(head) - len(tail)
    if budget < MIN_BODY:
        raise ValueError(
            f"A {length}-token prompt leaves {budget} tokens for the text after the "
            f"instructions ({len(head) + len(tail)} tokens); ask for a longer length."
        )
    return budget


def place(
    units: Iterable[list[int]], insert: list[int], budget: int, depth: float
) -> tuple[list[int], int]:
    """Filler units with `insert` between two of them near `depth`, cut to `budget` tokens.

    Returns the tokens and where the insert starts. The insert always survives the cut.
    """
    room = budget - len(insert)
    if room < 0:
        raise ValueError(
            f"The inserted text ({len(insert)} tokens) does not fit the {budget}-token body: "
            "ask for a longer length."
        )
    chosen: list[list[int]] = []
    starts: list[int] = []
    total = 0
    for unit in units:
        if total >= room:
            break
        starts.append(total)
        chosen.append(unit)
        total += len(unit)
    if total < room:
        raise ValueError(f"Not enough filler text for a {budget}-token body.")
    j = min(range(len(starts)), key=lambda i: abs(starts[i] - depth * room))
    tokens = [t for unit in chosen[:j] for t in unit] + insert
    tokens += [t for unit in chosen[j:] for t in unit]
    return tokens[:budget], starts[j]


def filler_units(tokenizer: Any, rng: random.Random) -> Iterator[list[int]]:
    """Paragraphs of the reference documentation, topics in a seeded order, as token lists."""
    topics = doc_topics()
    rng.shuffle(topics)
    for name in topics:
        for paragraph in topic_paragraphs(name):
            yield tokenizer.encode(paragraph + "\n\n", add_special_tokens=False)


def _rng(seed: int, task: str, length: int, index: int) -> random.Random:
    return random.Random(f"{seed}/{task}/{length}/{index}")


def _inserted(
    tokenizer: Any,
    spec: tuple[str, int, int, bool],
    frame: Frame,
    insert_text: str,
    units: Iterable[list[int]],
    answer: str,
    scorer: str,
    **meta: Any,
) -> Task:
    """A task whose body is filler units with one inserted text holding the answer.

    spec: (task name, instance index, length, chat).
    """
    name, index, length, chat = spec
    head, tail = frame_tokens(tokenizer, frame, chat)
    budget = body_budget(length, head, tail)
    insert = tokenizer.encode(insert_text, add_special_tokens=False)
    depth = DEPTHS[index % len(DEPTHS)]
    body, start = place(units, insert, budget, depth)
    begin = len(head) + start
    meta.update(depth=depth, answer_span=[begin, begin + len(insert)])
    return Task(name, index, head + body + tail, answer, scorer, MAX_TOKENS[name], meta)


def _question_frame(instruction: str, question: str, cue: str, prefill: bool = False) -> Frame:
    """Instruction, body, question; plain text ends with `Answer: cue`, a chat turn starts the
    answer with the cue only if `prefill` (a small chat model may not find the answer without)."""
    return Frame(
        user=f"{instruction}\n\n{BODY}\n\n{question}",
        prefill=cue if prefill else "",
        plain=f"{instruction}\n\n{BODY}\n\nQuestion: {question}\nAnswer: {cue}",
    )


def build_passkey(tokenizer: Any, length: int, index: int, seed: int, chat: bool) -> Task:
    rng = _rng(seed, "passkey", length, index)
    key = str(rng.randint(10000, 99999))
    frame = _question_frame(
        "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.",
        "What is the pass key? Answer with the number only.",
        "The pass key is",
    )
    fact = f"The pass key is {key}. Remember it. {key} is the pass key.\n\n"
    spec = ("passkey", index, length, chat)
    return _inserted(tokenizer, spec, frame, fact, filler_units(tokenizer, rng), key, "number")


def build_kv(tokenizer: Any, length: int, index: int, seed: int, chat: bool) -> Task:
    rng = _rng(seed, "kv", length, index)
    keys = rng.sample(topic_words(), KV_PAIRS)
    values = [str(v) for v in rng.sample(range(1000, 10000), KV_PAIRS)]
    asked = rng.randrange(KV_PAIRS)
    table = "Key-value table:\n" + "".join(f"{k}: {v}\n" for k, v in zip(keys, values)) + "\n"
    frame = _question_frame(
        "Read the text below. It contains a table of keys and values.",
        f'What is the value of the key "{keys[asked]}" in the table? Answer with the number only.',
        f'The value of the key "{keys[asked]}" is',
    )
    units = filler_units(tokenizer, rng)
    spec = ("kv", index, length, chat)
    answer = values[asked]
    return _inserted(
        tokenizer, spec, frame, table, units, answer, "number", key=keys[asked], row=asked
    )


def mdqa_document(f: FunctionDoc) -> str:
    return f"Function: {f.name}\nModule: {f.module}\n{_clip(f.doc, MDQA_DOC_CHARS)}\n\n"


def mdqa_frame(gold: FunctionDoc) -> Frame:
    return _question_frame(
        "Below is the documentation of some Python functions.",
        f"In which module is the function {gold.name} defined? Answer with the module name only.",
        f"Function: {gold.name}\nModule:",
        prefill=True,
    )


def build_mdqa(tokenizer: Any, length: int, index: int, seed: int, chat: bool) -> Task:
    rng = _rng(seed, "mdqa", length, index)
    pool = list(function_docs())
    rng.shuffle(pool)

    def fits(gold: FunctionDoc) -> bool:  # the gold document may fill at most half of the body
        head, tail = frame_tokens(tokenizer, mdqa_frame(gold), chat)
        size = len(tokenizer.encode(mdqa_document(gold), add_special_tokens=False))
        return size <= body_budget(length, head, tail) // 2

    gold = next((f for f in pool if fits(f)), None)
    if gold is None:
        raise ValueError(f"No function documentation fits a {length}-token mdqa prompt.")
    distractors = (f for f in pool if f.module != gold.module)  # one right module
    units = (tokenizer.encode(mdqa_document(f), add_special_tokens=False) for f in distractors)
    spec, doc, frame = ("mdqa", index, length, chat), mdqa_document(gold), mdqa_frame(gold)
    answer = gold.module
    return _inserted(tokenizer, spec, frame, doc, units, answer, "contains", function=gold.name)


def _clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters at a line end (whole if it fits)."""
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[: cut if cut > 0 else limit]


def _statement_lines(text: str) -> set[int]:
    """0-based indices of lines that start with a name or keyword token (code, not strings,
    comments, numbers or the inside of a docstring)."""
    starts: set[int] = set()
    seen: set[int] = set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            row = tok.start[0] - 1
            if tok.type in (tokenize.INDENT, tokenize.DEDENT, tokenize.NL, tokenize.NEWLINE):
                continue
            if row not in seen:
                seen.add(row)
                if tok.type == tokenize.NAME:
                    starts.add(row)
    except (tokenize.TokenError, SyntaxError):
        return set()
    return starts


def _code_target(text: str, lines: list[str], rng: random.Random, first: int, window: int):
    """A line from `first` on worth predicting: a statement of ≥ 12 characters resembling one of
    the `window` lines before it, other than the line just before. None if the file has none."""
    statements = _statement_lines(text)
    candidates = [
        i for i in range(first, len(lines)) if i in statements and len(lines[i].strip()) >= 12
    ]
    rng.shuffle(candidates)
    matcher = difflib.SequenceMatcher(autojunk=False)
    for i in candidates[:200]:
        matcher.set_seq2(lines[i].strip())
        for line in lines[max(0, i - window) : i - 1]:
            matcher.set_seq1(line.strip())
            if matcher.real_quick_ratio() > 0.7 and matcher.ratio() > 0.7:
                return i
    return None


def code_context(tokenizer: Any, context: str, line: str) -> list[int]:
    """Tokens of `context` and the start of `line` up to its first code character, as they
    tokenize with the line after them: a prompt ending in a lone indent token would be unnatural
    (BPE merges a newline with the indent), so the model writes what the last token leaves."""
    code = line.strip()
    ids = tokenizer.encode(context + line.rstrip("\n"), add_special_tokens=False)
    for dropped in range(1, min(len(ids), 4 * len(code) + 8)):
        if code in tokenizer.decode(ids[-dropped:]):
            return ids[:-dropped]
    indent = line[: len(line) - len(line.lstrip())]  # a tokenizer whose decode alters the code
    return tokenizer.encode(context + indent, add_special_tokens=False)


def build_code(tokenizer: Any, length: int, index: int, seed: int, chat: bool) -> Task:
    rng = _rng(seed, "code", length, index)
    files = list(source_files())
    random.Random(f"{seed}/code/{length}").shuffle(files)
    root = stdlib_path()
    min_chars = 3 * length  # code runs ~3-4 characters per token: enough context for a tokenizer
    window = max(10, min(200, length // 20))  # lines surely inside the context
    # Distinct files for the first _STRIDE instances; long prompts may need any long file.
    preferred = files[index % _STRIDE :: _STRIDE]
    others = [f for i, f in enumerate(files) if i % _STRIDE != index % _STRIDE]
    for path in preferred + others:
        text = read_source(path)
        if text is None or len(text) < 2 * min_chars:
            continue
        lines = text.splitlines(keepends=True)
        ends = list(itertools.accumulate(map(len, lines)))
        first = bisect.bisect_left(ends, min_chars) + 1
        target = _code_target(text, lines, rng, first, window)
        if target is None:
            continue
        name = path.relative_to(root).as_posix()
        line = lines[target]
        frame = Frame(
            user=f"Show the source code of the Python standard library file {name}.",
            prefill=f"```python\n{BODY}",
            plain=f"# Python standard library file {name}\n{BODY}",
        )
        head, tail = frame_tokens(tokenizer, frame, chat)
        budget = body_budget(length, head, tail)
        start = max(0, bisect.bisect_left(ends, ends[target - 1] - 2 * min_chars))
        body = code_context(tokenizer, "".join(lines[start:target]), line)[-budget:]
        if len(body) < budget:
            continue
        meta = {"file": name, "line": target + 1}
        tokens = head + body + tail
        return Task("code", index, tokens, line.strip(), "edit", MAX_TOKENS["code"], meta)
    raise ValueError(f"No standard library file is long enough for a {length}-token code task.")


BUILDERS: dict[str, Callable[[Any, int, int, int, bool], Task]] = {
    "passkey": build_passkey,
    "kv": build_kv,
    "code": build_code,
    "mdqa": build_mdqa,
}


def build_tasks(
    tokenizer: Any,
    names: Iterable[str],
    length: int,
    num: int,
    seed: int,
    chat: bool,
    first: int = 0,
) -> list[Task]:
    """`num` instances of each named task, `length` tokens each, numbered from `first`: a prompt
    depends only on its seed, task, length and index, so a later run extends an earlier one."""
    names = list(names)
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise ValueError(f"Unknown eval tasks {unknown}; tasks: {', '.join(BUILDERS)}.")
    indices = range(first, first + num)
    return [BUILDERS[n](tokenizer, length, i, seed, chat) for n in names for i in indices]
