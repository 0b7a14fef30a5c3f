"""Tensor and pipeline parallel under `mlx.launch -n 2 --backend ring` (two local processes),
and the refusals.

The launched tests run tests/distributed_worker.py (or the CLI) on tiny random model folders: the
two ranks must agree on every token and every selection, with nothing pruned match mlx-lm's own
generate (sharded, for tensor parallel), and with a schedule match the single-process engine on
the unsharded model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lazyllm_mlx
from lazyllm_mlx import distributed
from lazyllm_mlx.cli import main
from lazyllm_mlx.fingerprint import model_fingerprint
from lazyllm_mlx.pipeline import pipeline_of, split_layers, split_model

import mlx.core as mx
import pytest
from distributed_worker import lazy_run
from mlx_lm.generate import generate_step as mlx_generate_step
from mlx_lm.utils import save_config, save_model
from tiny_models import COMMON, FAMILY_CONFIGS, random_prompt, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
SHARDED_FAMILIES = ("llama", "qwen2", "qwen3")  # the engine's families mlx-lm can shard
PIPELINED_FAMILIES = ("llama", "gemma3_text")  # any family: mixed sliding and global layers too
# The paper's rule (heads averaged: a sum across ranks) and a window rule (heads by max).
SCHEDULES = ("paper", "2:0.5,5:0.6,8:0.5;w=8;pool=3;heads=max;cap=4;margin=0.5;every=2")
# mlx-lm's launcher, beside this Python (a venv need not be on PATH), else on PATH.
LAUNCHER = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which(
    "mlx.launch"
)
launched = pytest.mark.skipif(
    not (mx.distributed.is_available() and LAUNCHER),
    reason="mlx.launch or the ring backend is unavailable",
)


def write_folder(folder: Path, family: str, **overrides) -> Path:
    save_model(folder, tiny_model(family, **overrides))
    save_config({**COMMON, **FAMILY_CONFIGS[family], **overrides}, folder / "config.json")
    tiny_tokenizer()._tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded")
    families = dict.fromkeys(SHARDED_FAMILIES + PIPELINED_FAMILIES)
    return {family: write_folder(root / family, family) for family in families}


def free_port_pair() -> int:
    """A port p with p and p + 1 free (the ring backend listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            with socket.socket() as other:
                other.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def launch(*command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Two local ranks over the ring backend, importing this worktree's code. The timeout only
    catches a hang (the machine may be loaded); then the launcher and both ranks are killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(WORKER.parent)])}
    argv = [LAUNCHER, "-n", "2", "--backend", "ring"]
    argv += ["--starting-port", str(free_port_pair()), "--", sys.executable, *command]
    with subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: the ranks go with it on a timeout
    ) as process:  # fmt: skip
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            pytest.fail(f"the launch hung for {timeout} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


def ranks(out: Path) -> tuple[dict, dict]:
    return tuple(json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))


@launched
def test_two_ranks_select_alike_and_match_one_process(folders, tmp_path):
    """Every family that shards, in one launch (start-up dominates): the ranks agree on every
    token, selection and aux cache; nothing pruned gives mlx-lm's sharded tokens; a schedule gives
    the single-process engine's tokens and selections, with one score reduction per boundary."""
    schedules = [f"--schedule={s}" for s in SCHEDULES]
    paths = [str(folders[family]) for family in SHARDED_FAMILIES]
    done = launch(str(WORKER), str(tmp_path), *paths, *schedules)
    assert (tmp_path / "rank1.json").exists(), done.stdout + done.stderr
    first, second = ranks(tmp_path)
    prompt = random_prompt(96)
    for family in SHARDED_FAMILIES:
        folder = folders[family]
        sharded = first[family]
        assert sharded == second[family]
        assert sharded["none"] == sharded["mlx_lm"]
        model, _ = lazyllm_mlx.load(str(folder))
        for schedule in SCHEDULES:
            alone = lazy_run(model, prompt, schedule, steps=8)
            assert sharded[schedule]["selections"] == alone["selections"], (family, schedule)
            assert sharded[schedule]["tokens"] == alone["tokens"], (family, schedule)
            assert sharded[schedule]["revived"] == alone["revived"] > 0
            boundaries = len(lazyllm_mlx.make_lazy_cache(model, schedule).schedule.boundaries)
            assert sum(sharded[schedule]["score_reductions"].values()) == boundaries


@launched
def test_two_pipeline_ranks_match_one_process(folders, tmp_path):
    """Each rank holding half the layers (or 3 and 7: a split inside a stage): the ranks agree on
    every token and selection, nothing pruned gives mlx-lm's tokens, a schedule the single-process
    engine's; only the kept and revived tokens' hidden states cross the split."""
    paths = [str(folders[family]) for family in PIPELINED_FAMILIES]
    schedules = [f"--schedule={s}" for s in SCHEDULES]
    done = launch(str(WORKER), str(tmp_path), *paths, *schedules, "--pipeline")
    assert (tmp_path / "rank1.json").exists(), done.stdout + done.stderr
    first, second = ranks(tmp_path)
    prompt = random_prompt(96)
    for family in PIPELINED_FAMILIES:
        model, _ = lazyllm_mlx.load(str(folders[family]))
        plain = [int(t) for t, _ in mlx_generate_step(prompt, model, max_tokens=8)]
        for split, runs in first[family].items():
            assert runs["none"] == second[family][split]["none"] == plain, (family, split)
            for schedule in SCHEDULES:
                alone = lazy_run(model, prompt, schedule, steps=8)
                mine, theirs = runs[schedule], second[family][split][schedule]
                for what in ("selections", "tokens", "revived", "prefill_fraction"):
                    assert mine[what] == theirs[what] == alone[what], (family, split, what)
                # rank 0 sends, at its last layer, the tokens in flight there: fewer than all
                assert theirs["prefill_sent_bytes"] == 0
                assert 0 < mine["prefill_sent_bytes"] < 96 * COMMON["hidden_size"] * 4
                boundaries = len(lazyllm_mlx.make_lazy_cache(model, schedule).schedule.boundaries)
                assert sum(mine["score_reductions"].values()) == boundaries


@launched
def test_cli_generate_splits_layers_where_heads_do_not_split(folders, capsys):
    """Gemma 3 has no tensor sharding in mlx-lm: the launch runs pipeline parallel, says so
    once, and generates what one process generates."""
    argv = ["generate", "--model", str(folders["gemma3_text"]), "--max-tokens", "6", "--json"]
    argv += ["-p", " ".join(f"t{i % 97 + 1}" for i in range(300)), "--compare"]
    argv += ["--schedule", SCHEDULES[1]]
    done = launch("-m", "lazyllm_mlx.cli", *argv)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout + done.stderr
    assert done.stderr.count("pipeline parallel: model type 'gemma3_text' has no tensor") == 1
    assert main(argv) == 0
    alone = json.loads(capsys.readouterr().out)
    for run in ("baseline", "lazy"):
        assert json.loads(lines[0])["runs"][run]["tokens"] == alone["runs"][run]["tokens"]


@launched
def test_a_rank_that_dies_ends_the_run_with_a_message(folders, tmp_path):
    done = launch(str(WORKER), str(tmp_path), str(folders["llama"]), "--die-rank=1", timeout=120)
    assert "rank 1: exiting early on purpose" in done.stderr
    # Rank 0, waiting in a collective, fails at once instead of hanging (or the launcher stops it).
    assert "connection to a peer was lost" in done.stderr or "rank 0 was killed" in done.stderr
    assert not (tmp_path / "rank0.json").exists()


@launched
def test_cli_generate_compare_prints_once_and_matches_one_process(folders, capsys):
    folder = str(folders["qwen3"])
    argv = ["generate", "--model", folder, "-p", " ".join(f"t{i % 97 + 1}" for i in range(300))]
    argv += ["--max-tokens", "6", "--json", "--compare", "--schedule", SCHEDULES[1]]
    done = launch("-m", "lazyllm_mlx.cli", *argv)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout + done.stderr  # rank 0 prints, rank 1 follows silently
    sharded = json.loads(lines[0])
    assert main(argv) == 0
    alone = json.loads(capsys.readouterr().out)
    for run in ("baseline", "lazy"):
        assert sharded["runs"][run]["tokens"] == alone["runs"][run]["tokens"]
    assert sharded["runs"]["lazy"]["prefill_fraction"] < 1.0


class Group:
    """A stand-in for an mx.distributed group of `size` ranks (the refusals need no launch)."""

    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def test_reduce_scores_is_the_identity_without_a_group():
    model = tiny_model("llama")
    scores = mx.arange(5, dtype=mx.float32)
    assert distributed.reduce_scores(scores, "max", model.layers[0]) is scores
    assert distributed.head_group(model.layers[0]) is None


@pytest.mark.parametrize(
    "family, overrides, size, says",
    [
        ("gemma3_text", {}, 2, "'gemma3_text' has no tensor-parallel sharding in mlx-lm"),
        ("phi3", {}, 2, "'phi3' has no tensor-parallel sharding"),
        ("llama", {}, 3, "4 query heads cannot be split evenly over 3 processes"),
        ("llama", dict(num_attention_heads=8), 4, "2 key-value heads cannot be split evenly"),
        ("qwen2", dict(intermediate_size=129), 2, "129 MLP width cannot be split evenly"),
    ],
)
def test_models_that_cannot_be_split_are_refused_before_sharding(family, overrides, size, says):
    model = tiny_model(family, **overrides)
    with pytest.raises(distributed.Refused, match=says):
        distributed.check_shardable(model, Group(size))
    distributed.check_shardable(tiny_model("llama"), Group(2))  # 4 / 2 heads, MLP 128


def test_sources_that_cannot_be_split_are_refused_before_loading(tmp_path, monkeypatch):
    """From config.json (or a GGUF header) alone: no weight is read."""
    gemma = write_folder(tmp_path / "gemma", "gemma3_text")
    monkeypatch.setattr("lazyllm_mlx.loading.load_source", pytest.fail)
    with pytest.raises(distributed.Refused, match="'gemma3_text' has no tensor-parallel"):
        distributed.load_sharded(gemma, Group(2))
    llama = write_folder(tmp_path / "llama", "llama")
    with pytest.raises(distributed.Refused, match="4 query heads cannot be split evenly over 3"):
        distributed.load_sharded(llama, Group(3))


def test_the_default_model_splits_over_three_processes_not_two():
    """SmolLM2-135M has 9 query and 3 KV heads (read from its GGUF header, no weights)."""
    with pytest.raises(distributed.Refused, match="9 query heads cannot be split evenly over 2"):
        distributed.check_source(None, Group(2))
    distributed.check_source(None, Group(3))


def test_a_tensor_and_a_pipeline_group_together_are_refused():
    with pytest.raises(distributed.Refused, match="not both"):
        distributed.load_sharded("unused", Group(2), pipeline_group=Group(2))


@pytest.mark.parametrize(
    "layers, size, split, starts",
    [(10, 2, None, (0, 5)), (30, 4, None, (0, 8, 16, 23)), (10, 2, [3, 7], (0, 3))],
)
def test_layers_split_into_ranges_in_rank_order(layers, size, split, starts):
    assert split_layers(layers, size, split) == starts


@pytest.mark.parametrize("layers, size, split", [(2, 3, None), (10, 2, [10, 0]), (10, 2, [4])])
def test_splits_that_leave_a_rank_no_layer_are_refused(layers, size, split):
    with pytest.raises(ValueError, match="each needs at least one layer"):
        split_layers(layers, size, split)


def test_a_split_rank_holds_its_layers_only_and_keeps_the_whole_models_fingerprint():
    model = tiny_model("llama")
    whole = model_fingerprint(model)
    split_model(model, Group(2, 1))
    assert [layer is None for layer in model.layers] == [True] * 5 + [False] * 5
    assert model_fingerprint(model) == whole
    assert pipeline_of(model).owner(4) == 0 and pipeline_of(model).owns(5)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["serve"], "`serve` does not run distributed yet"),
        (["bench"], "`bench` does not run under mlx.launch"),
        (["generate", "--adapter-path", "a"], "--adapter-path is not supported distributed"),
        (["generate", "--prompt-cache-file", "c"], "--prompt-cache-file is not supported"),
    ],
)
@pytest.mark.parametrize("rank", [0, 1])
def test_launched_commands_are_refused_once_by_rank_0(monkeypatch, capsys, argv, says, rank):
    monkeypatch.setattr(distributed, "is_launched", lambda: True)
    monkeypatch.setattr(distributed, "world", lambda: Group(2, rank))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (says in err and err.count("\n") == 1) if rank == 0 else err == ""


def test_an_error_on_one_rank_names_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(distributed, "is_launched", lambda: True)
    monkeypatch.setattr(distributed, "world", lambda: Group(2, 1))
    assert main(["generate", "--model", str(tmp_path / "missing")]) == 2
    assert "error (rank 1 of 2):" in capsys.readouterr().err


def test_every_rank_samples_with_the_same_seed(monkeypatch):
    """Each process has its own default PRNG key: unseeded sampling would desync the ranks."""
    seen = []
    monkeypatch.setattr(distributed, "world", lambda: Group(2, 1))
    args = SimpleNamespace(command="generate", seed=None)
    assert distributed.run_command(lambda a: seen.append(a.seed), args) == 0
    assert seen == [0]


def test_rank_0_prints_and_the_others_do_not(capsys):
    for rank in (0, 1):
        with distributed.rank0_output(Group(2, rank)):
            print(f"from rank {rank}")
    assert capsys.readouterr().out == "from rank 0\n"


def test_the_benchmark_script_runs_in_one_process(tmp_path, monkeypatch, capsys):
    """tools/distributed_bench.py in a group of one (no collectives): its table and JSON."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", ROOT / "tools" / "distributed_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    argv = ["--twin", "--tokens", "64", "--repeats", "1", "--schedule", "8:0.5,18:0.5"]
    monkeypatch.setattr(sys, "argv", ["distributed_bench.py", *argv, "--out", str(out)])
    assert bench.main() == 0
    result = json.loads(out.read_text())
    assert list(result["runs"]) == ["baseline", "none", "lazy"]
    assert result["runs"]["lazy"]["prefill_fraction"] < 1.0
    assert result["runs"]["baseline"]["bytes"] == 0  # a group of one sends nothing
    assert "lazy" in capsys.readouterr().out
