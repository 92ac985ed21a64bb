"""CSV file lists (dinoserve.filelist): where relative paths point, and errors that name the input."""

from __future__ import annotations

import pytest

from dinoserve.errors import DataError
from dinoserve.filelist import FileEntry, read_file_list


def test_read_file_list_resolves_relative_and_absolute_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"x")
    absolute = tmp_path / "elsewhere.png"
    absolute.write_bytes(b"x")
    csv_path = tmp_path / "list.csv"
    csv_path.write_text(f"path,category,split\nimgs/a.png,cat,knn_train\n{absolute},,pool\nimgs/b.png,dog,\n")

    entries = read_file_list(csv_path)
    assert entries == [FileEntry(tmp_path / "imgs" / "a.png", "cat", "knn_train"),
                       FileEntry(absolute, None, "pool"),
                       FileEntry(tmp_path / "imgs" / "b.png", "dog", None)]
    assert read_file_list(csv_path, splits="pool") == [FileEntry(absolute, None, "pool")]
    other = read_file_list(csv_path, splits=["knn_train"], root=tmp_path / "imgs" / "..")
    assert other[0].path.resolve() == (tmp_path / "imgs" / "a.png").resolve()


def test_read_file_list_errors_name_the_input(tmp_path):
    with pytest.raises(DataError, match="missing.csv: no such file list"):
        read_file_list(tmp_path / "missing.csv")

    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.png,x\n")
    with pytest.raises(DataError, match="missing column.*path"):
        read_file_list(bad)

    ok = tmp_path / "ok.csv"
    (tmp_path / "a.png").write_bytes(b"x")
    ok.write_text("path,category,split\na.png,x,knn_train\na.png,x,pool\n")
    with pytest.raises(DataError, match=r"unknown split\(s\) 'test'; the file has knn_train, pool"):
        read_file_list(ok, splits=["knn_train", "test"])

    with pytest.raises(DataError, match=r"none of its 2 listed images exists under .*nowhere.*--data-root"):
        read_file_list(ok, root=tmp_path / "nowhere")


def test_openclipart_list_defaults_to_the_debian_folder_and_says_how_to_install(tmp_path):
    csv_path = tmp_path / "openclipart_knn.csv"
    csv_path.write_text("path,category,split\nno_such_topic/x_01.png,x,knn_val\n")
    with pytest.raises(DataError) as e:
        read_file_list(csv_path)
    assert "/usr/share/openclipart/png" in str(e.value)
    assert "apt-get install -y openclipart-png" in str(e.value)
