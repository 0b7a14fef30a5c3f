"""The README's Python API snippet runs as written (on a shorter slice of its document)."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_the_python_api_snippet_runs(capsys, monkeypatch):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S)[1]
    assert "apply_chat_template" in snippet  # the instruct model needs its template, as in mlx-lm
    short = snippet.replace(".read()", ".read()[:1500]").replace("max_tokens=64", "max_tokens=4")
    monkeypatch.chdir(ROOT)
    exec(compile(short, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Prompt:" in out and "Generation:" in out  # generate(verbose=True) printed its stats
    assert os.path.exists(ROOT / "examples" / "long_document.txt")
