"""docs/MLX_LM_PARITY.md names every flag of mlx-lm's commands and every field its server reads,
each in its command's section, and our parsers take every one of those flags."""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
from pathlib import Path

import pytest

PAGE = Path(__file__).parent.parent / "docs" / "MLX_LM_PARITY.md"
# mlx-lm module -> (our command, the page's section)
COMMANDS = {
    "generate": ("generate", "generate"),
    "cache_prompt": ("cache-prompt", "cache-prompt"),
    "convert": ("convert", "convert"),
    "server": ("serve", "serve"),
}


class _Parsed(Exception):
    pass


def mlx_lm_parser(module: str) -> argparse.ArgumentParser:
    """The parser mlx-lm's command builds: its main() is run up to parse_args, then stopped."""

    def stop(parser, *args, **kwargs):
        raise _Parsed(parser)

    main = importlib.import_module(f"mlx_lm.{module}").main
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", stop)
        with pytest.raises(_Parsed) as parsed:
            main()
    return parsed.value.args[0]


def flags(parser: argparse.ArgumentParser) -> set[str]:
    return {f for a in parser._actions for f in a.option_strings if f not in ("-h", "--help")}


def section(title: str) -> str:
    text = PAGE.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no section '## {title}'"
    return match.group(1)


@pytest.mark.parametrize("module", COMMANDS)
def test_every_mlx_lm_flag_is_on_the_page_and_parsed(module):
    command, title = COMMANDS[module]
    theirs = flags(mlx_lm_parser(module))
    text = section(title)
    missing = sorted(f for f in theirs if not re.search(rf"`{re.escape(f)}`", text))
    assert not missing, f"'## {title}' does not name {missing}"
    ours = argparse.ArgumentParser()
    importlib.import_module(f"lazyllm_mlx.cli.{command.replace('-', '_')}").add_arguments(ours)
    assert theirs <= flags(ours), sorted(theirs - flags(ours))


def test_every_request_field_mlx_lm_s_server_reads_is_on_the_page():
    import mlx_lm.server

    source = inspect.getsource(mlx_lm.server.APIHandler)
    fields = set(re.findall(r'body\.get\(\s*"(\w+)"', source))
    fields |= set(re.findall(r'body\["(\w+)"\]', source))
    assert {"messages", "prompt", "temperature", "logit_bias"} <= fields  # the search works
    text = section("serve: request fields")
    missing = sorted(f for f in fields if f"`{f}`" not in text)
    assert not missing, f"'## serve: request fields' does not name {missing}"
