"""The lazy engine over an `mx.distributed` group (`mlx.launch`), as mlx-lm runs a sharded model.

Tensor parallel: mlx-lm's `model.shard(group)` gives every rank a slice of each layer's query
and KV heads, so each rank can only score its own heads. `reduce_scores` combines a boundary's
(N,) score vector across the ranks the way the rule combines heads (max of maxes; mean of equal-
sized means), one collective per boundary, so every rank selects, revives and decodes the same
tokens. Hidden states are already identical on every rank (the sharded projections sum them).

Pipeline parallel (pipeline.py): each rank holds a range of layers; `load_sharded` with a
pipeline_group splits them. Distributed serving is refused (see the message below).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# Commands that run under `mlx.launch`; the others refuse with one line.
DISTRIBUTED_COMMANDS = ("generate",)
SERVE_REASON = (
    "`serve` does not run distributed yet: the other ranks would have to follow rank 0's "
    "requests step by step; run it in one process"
)


class Refused(ValueError):
    """What a distributed run cannot do; every rank finds it the same way, before any work."""


def world() -> mx.distributed.Group:
    """The group `mlx.launch` started this process in (a group of one otherwise)."""
    return mx.distributed.init()


def is_launched() -> bool:
    """Whether this process was started by `mlx.launch` (or mpirun) with other ranks."""
    if not any(name in os.environ for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")):
        return False  # no launcher: do not let init() pick a backend for nothing
    return world().size() > 1


def head_group(block: nn.Module) -> mx.distributed.Group | None:
    """The group a tensor-sharded block splits its attention heads over (mlx-lm's shard makes
    its output projection sum over it); None when this process holds every head."""
    attention = getattr(block, "self_attn", None)
    group = getattr(getattr(attention, "o_proj", None), "group", None)
    return group if group is not None and group.size() > 1 else None


def reduce_scores(scores: mx.array, heads: str, block: nn.Module) -> mx.array:
    """A boundary's (N,) scores, combined from this rank's heads, over every rank's heads.

    The rule combines heads by max or mean (pruning.combine_heads); the max of the ranks' maxima
    is the max over all heads, and the mean of the ranks' means (each over as many heads) is the
    mean over all heads, up to the order of the float sums. Identity without a group.
    """
    group = head_group(block)
    if group is None:
        return scores
    if heads == "max":
        return mx.distributed.all_max(scores, group=group)
    return mx.distributed.all_sum(scores, group=group) / group.size()


def _sizes_to_divide(args: Any) -> dict[str, int | None]:
    get = args.get if isinstance(args, dict) else lambda key: getattr(args, key, None)
    heads = get("num_attention_heads")
    return {
        "query heads": heads,
        "key-value heads": get("num_key_value_heads") or heads,
        "MLP width": get("intermediate_size"),
    }


def _check_split(model_type: str, shards: bool, args: Any, size: int) -> None:
    if not shards:
        raise Refused(
            f"model type {model_type!r} has no tensor-parallel sharding in mlx-lm, so it cannot "
            f"be split over {size} processes; run it in one process"
        )
    for what, count in _sizes_to_divide(args).items():
        if isinstance(count, int) and count % size:
            raise Refused(
                f"the model's {count} {what} cannot be split evenly over {size} processes; "
                f"launch a number of processes that divides {count}"
            )


def check_shardable(model: nn.Module, group: mx.distributed.Group) -> None:
    """Raise a one-line Refused where mlx-lm's tensor sharding of `model` over `group` cannot
    give every rank an equal slice of heads (checked before any weight is sharded)."""
    from .families import model_type_of

    args = getattr(model, "args", None)
    _check_split(model_type_of(model), hasattr(model, "shard"), args, group.size())


def source_config(source: str | Path | None) -> dict[str, Any] | None:
    """The config of a model folder or GGUF file, read without its weights; None for a hub id
    or what cannot be read (loading then says what is wrong)."""
    from .default_model import default_model_path
    from .gguf.loader import gguf_to_config
    from .gguf.reader import read_header, read_tensor

    path = Path(default_model_path() if source is None else source).expanduser()
    try:
        if path.is_dir():
            return json.loads((path / "config.json").read_text(encoding="utf-8"))
        header = read_header(path)
        data = np.memmap(header.path, np.uint8, mode="r")
        return gguf_to_config(header, lambda info: read_tensor(data, info))
    except Exception:  # noqa: BLE001  (any unreadable source: load_source explains it)
        return None


def check_source(source: str | Path | None, group: mx.distributed.Group) -> None:
    """check_shardable from the config alone: refuses before a weight is read."""
    from ._mlx_lm_private import model_class

    config = source_config(source)
    if config is None or group.size() == 1:
        return
    try:
        shards = hasattr(model_class(config), "shard")
    except ValueError:
        return  # a family mlx-lm lacks: loading says so
    _check_split(str(config.get("model_type")), shards, config, group.size())


def shard(model: nn.Module, group: mx.distributed.Group | None = None) -> nn.Module:
    """Tensor-shard a loaded model over `group` (default: the launched one) with mlx-lm's
    `model.shard`, after check_shardable; evaluates the local slices. Returns the model."""
    group = group or world()
    check_shardable(model, group)
    if group.size() > 1:
        model.shard(group)
    mx.eval(model.parameters())
    return model


def load_sharded(
    path_or_hf_repo: str | Path | None = None,
    group: mx.distributed.Group | None = None,
    *,
    pipeline_group: mx.distributed.Group | None = None,
    dtype: mx.Dtype | None = None,
    **load_options: Any,
) -> tuple[nn.Module, Any]:
    """`(model, tokenizer)` like `lazyllm_mlx.load`, tensor-sharded over `group` (default: the
    group `mlx.launch` started), or, given a pipeline_group instead, split into ranges of layers
    over it (pipeline.split_model). Weights are read lazily, so each rank reads only its share
    of an MLX folder. Every rank must call it."""
    from ._platform import default_dtype
    from .loading import load_source
    from .pipeline import split_model

    if pipeline_group is not None and group is not None:
        raise Refused("give a tensor group or a pipeline group, not both")
    group = pipeline_group or group or world()
    if pipeline_group is None:
        check_source(path_or_hf_repo, group)
    model, tokenizer, config, _ = load_source(
        path_or_hf_repo, dtype or default_dtype(), lazy=True, **load_options
    )
    if isinstance(config.get("lazyllm"), dict):  # a stored schedule, as load() keeps it
        object.__setattr__(model, "lazyllm_schedule", dict(config["lazyllm"]))
    if pipeline_group is None:
        shard(model, group)
    else:
        split_model(model, pipeline_group)
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))  # all loaded
    return model, tokenizer


def tensor_refusal(source: str | Path | None, group: mx.distributed.Group) -> str | None:
    """Why `source` cannot be split tensor-parallel over `group` (None when it can)."""
    try:
        check_source(source, group)
    except Refused as error:
        return str(error)
    return None


def check_command(command: str, args: Any) -> None:
    """Refuse, with one line, what a distributed launch cannot run (before any work)."""
    if command == "serve":
        raise Refused(SERVE_REASON)
    if command not in DISTRIBUTED_COMMANDS:
        raise Refused(
            f"`{command}` does not run under mlx.launch; distributed runs support: "
            + ", ".join(DISTRIBUTED_COMMANDS)
        )
    if getattr(args, "adapter_path", None):
        raise Refused(
            "--adapter-path is not supported distributed (nor by mlx-lm): the adapter's layers "
            "are not sharded; fuse it into the model first (mlx_lm.fuse)"
        )
    if getattr(args, "prompt_cache_file", None):
        raise Refused(
            "--prompt-cache-file is not supported distributed: a saved prompt cache holds one "
            "process's KV; run without it"
        )


def run_command(run: Callable[[Any], int | None], args: Any) -> int:
    """A CLI command under mlx.launch: only rank 0 prints. A refusal (every rank finds it) is said
    once, by rank 0; any other error is said by each rank it happens on, naming ranks other than
    0, so a failure on one machine alone (a model path missing there) is not lost."""
    group = world()
    rank, name = group.rank(), f"lazyllm-mlx {args.command}"
    if getattr(args, "seed", 0) is None:  # each process draws its own default key
        args.seed = 0  # the same on every rank, or sampling would pick different tokens
    try:
        check_command(args.command, args)
        with rank0_output(group):
            return run(args) or 0
    except Refused as error:
        if rank == 0:
            print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not str(error).startswith("["):
            raise  # not the backend's ("[ring] connection to a peer was lost"): a bug, in full
        print(f"{name}: error (rank {rank} of {group.size()}): {error}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def rank0_output(group: mx.distributed.Group | None = None) -> Iterator[None]:
    """Only rank 0 prints (as mlx-lm's distributed commands do): the other ranks' stdout and
    stderr are silenced inside the block; tracebacks that escape it still show."""
    group = group or world()
    if group.rank() == 0:
        yield
        return
    with open(os.devnull, "w") as sink:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield


@dataclass
class Traffic:
    """Collectives issued while counting: how many, and the bytes of their payloads; the bytes
    sent point to point apart."""

    calls: int = 0
    bytes: int = 0
    by_shape: dict[tuple[int, ...], int] = field(default_factory=dict)
    sent_bytes: int = 0


@contextlib.contextmanager
def count_collectives() -> Iterator[Traffic]:
    """Count the all_sum/all_max payloads this process sends into while the block runs (the
    sharded layers' sums and the boundaries' score reductions), and its point-to-point sends (a
    pipeline's hidden states): what one rank contributes."""
    traffic = Traffic()
    names = ("all_sum", "all_max", "send")
    originals = {name: getattr(mx.distributed, name) for name in names}

    def counted(inner, name):
        def collective(x, *args, **kwargs):
            group = kwargs.get("group")
            if name == "send":
                traffic.sent_bytes += x.nbytes
            elif group is None or group.size() > 1:
                traffic.calls += 1
                traffic.bytes += x.nbytes
                traffic.by_shape[x.shape] = traffic.by_shape.get(x.shape, 0) + 1
            return inner(x, *args, **kwargs)

        return collective

    for name, inner in originals.items():
        setattr(mx.distributed, name, counted(inner, name))
    try:
        yield traffic
    finally:
        for name, inner in originals.items():
            setattr(mx.distributed, name, inner)
