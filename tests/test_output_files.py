"""Output files: replaced whole, only where a regular file (or nothing) stood; symlinks followed."""

from __future__ import annotations

import json
import os
import socket
import stat

from lazyllm_mlx.cli import main
from lazyllm_mlx.output_files import check_writable, write_atomically, write_json

import pytest


def test_a_new_file_and_a_replaced_one_keep_their_modes(tmp_path):
    new = tmp_path / "report.json"
    write_json(new, {"a": 1})
    assert json.loads(new.read_text()) == {"a": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    new.chmod(0o640)
    write_json(new, {"a": 2})
    assert json.loads(new.read_text()) == {"a": 2} and stat.S_IMODE(new.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "cache.safetensors"
    target.write_text("old")

    def fail(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(OSError, match=f"cannot write {target}: disk full"):
        write_atomically(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_symlink_is_followed_and_stays_a_link(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_json(link, [1])
    assert link.is_symlink() and json.loads(real.read_text()) == [1]
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "made.json")
    write_json(dangling, [2])  # as a shell's `>` does: the file the link names is created
    assert dangling.is_symlink() and json.loads((tmp_path / "made.json").read_text()) == [2]


def special_files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    folder = tmp_path / "folder"
    folder.mkdir()
    link_to_folder = tmp_path / "to-folder"
    link_to_folder.symlink_to(folder)
    cases = [(fifo, "a FIFO"), (tmp_path / "sock", "a socket"), (folder, "a directory"),
             (link_to_folder, "a directory")]  # fmt: skip
    if os.path.exists("/dev/null"):
        cases.append(("/dev/null", "a character device"))
    return cases, sock


def test_devices_fifos_sockets_and_directories_are_refused_untouched(tmp_path):
    cases, sock = special_files(tmp_path)
    try:
        for path, kind in cases:
            before = os.lstat(path)
            for call in (check_writable, lambda p: write_json(p, {})):
                with pytest.raises(OSError, match=f"is {kind}, not a regular file: refusing"):
                    call(path)
            after = os.lstat(path)
            assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino), path
    finally:
        sock.close()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(OSError, match="no folder"):
        write_json(tmp_path / "no" / "out.json", {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["cache-prompt", "-p", "Hi", "--prompt-cache-file", "{}"],
        ["probe", "--json", "{}"],
        ["bench", "--json", "{}"],
        ["eval", "--json", "{}"],
        ["eval", "--plot", "{}"],
    ],
)
def test_the_cli_refuses_special_outputs_before_any_work(capsys, tmp_path, argv):
    cases, sock = special_files(tmp_path)
    try:
        for path, kind in cases:
            before = os.lstat(path)
            with pytest.raises(SystemExit) as exit:
                main([a.replace("{}", str(path)) for a in argv])
            err = capsys.readouterr().err
            assert exit.value.code == 2 and "Traceback" not in err
            assert f"is {kind}, not a regular file" in err.strip().splitlines()[-1]
            assert os.lstat(path).st_mode == before.st_mode
    finally:
        sock.close()
