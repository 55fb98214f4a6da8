"""safe_files: the one atomic write, also as a stream for files of any size."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from profit_prep.errors import InputError
from profit_prep.store.safe_files import atomic_path_file, atomic_write_bytes


def test_a_streamed_file_appears_whole_with_ordinary_permissions(tmp_path: Path) -> None:
    target = tmp_path / "made" / "cache.arrow"  # the folder is made
    with atomic_path_file(target) as f:
        for i in range(5):
            f.write(bytes([i]) * 1000)
            assert not target.exists()  # nothing visible until the stream is done
            assert [p.name.startswith(".cache.arrow.") for p in target.parent.iterdir()] == [True]
    assert target.read_bytes() == b"".join(bytes([i]) * 1000 for i in range(5))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert os.listdir(target.parent) == ["cache.arrow"]


def test_a_failed_stream_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "cache.arrow"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="stop"), atomic_path_file(target) as f:
        f.write(b"new, half written")
        raise RuntimeError("stop")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["cache.arrow"]


def test_a_stream_is_never_renamed_over_a_link_or_a_folder(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"keep")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "folder").mkdir()
    for name in ("link", "folder"):
        with pytest.raises(InputError, match=f"{name} is a (link|folder)"), \
                atomic_path_file(tmp_path / name) as f:
            f.write(b"x")
    assert (tmp_path / "real").read_bytes() == b"keep" and (tmp_path / "link").is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["folder", "link", "real"]
