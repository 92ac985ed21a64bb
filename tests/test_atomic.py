"""Crash-safe writes leave the permissions a plain write would: the umask's for a new file,
the old file's own when replacing one (mkstemp's 0600 hid config.pbtxt from other users)."""

from __future__ import annotations

import os
import stat

import pytest

from dinoserve.atomic import atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_a_new_file_gets_what_open_would_give_it(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "atomic.txt", "x")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "atomic.txt") == _mode(tmp_path / "plain.txt") == 0o666 & ~umask


def test_replacing_a_file_keeps_its_permissions(tmp_path):
    target = tmp_path / "config.pbtxt"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write_text(target, "new")
    assert (target.read_text(), _mode(target)) == ("new", 0o640)
    assert [p.name for p in tmp_path.iterdir()] == ["config.pbtxt"]  # no temp file left behind
