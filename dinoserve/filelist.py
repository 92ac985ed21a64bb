"""CSV file lists of images: ``path,category,split`` rows, as in ``openclipart_knn.csv``.

Pure Python (no torch), so data code, k-NN evaluation and the CLI can share it.

Where relative paths point (one rule, first match wins):

1. ``root`` when the caller passes one (the CLI's ``--data-root``);
2. the known install folder of a known list: :data:`DEFAULT_ROOTS` maps a CSV file name
   to the folder its paths are relative to (``openclipart_knn.csv`` ->
   ``/usr/share/openclipart/png``, where ``apt-get install -y openclipart-png`` puts them);
3. the CSV's own folder.

Absolute paths in the CSV are used as they are. When none of the listed files exists, a
:class:`~dinoserve.errors.DataError` names the folder that was tried and how to fix it;
single missing files are left to the loader, which skips and counts them like any other
unreadable image.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from dinoserve.errors import DataError
from dinoserve.images import IMAGE_EXTENSIONS, walk_images

__all__ = ["FileEntry", "DEFAULT_ROOTS", "read_file_list", "default_root", "splits_of"]

#: CSV file name -> folder its relative paths are relative to, with the hint shown when
#: the folder is missing.
DEFAULT_ROOTS: dict[str, tuple[Path, str]] = {
    "openclipart_knn.csv": (
        Path("/usr/share/openclipart/png"),
        "install the images with `apt-get install -y openclipart-png` (after `apt-get update`)",
    ),
}

REQUIRED_COLUMNS = ("path",)
OPTIONAL_COLUMNS = ("category", "split")


@dataclass(frozen=True)
class FileEntry:
    """One row of a file list: an image path and its optional label and split."""

    path: Path
    category: str | None = None
    split: str | None = None


def default_root(csv_path: str | os.PathLike) -> Path:
    """The folder relative paths of ``csv_path`` resolve against when no root is given."""
    csv_path = Path(csv_path)
    known = DEFAULT_ROOTS.get(csv_path.name)
    return known[0] if known else csv_path.resolve().parent


def _hint(csv_path: Path, explicit: bool) -> str:
    known = DEFAULT_ROOTS.get(csv_path.name)
    if known and not explicit:
        return f"{known[1]}, or pass the folder that holds them with --data-root"
    return "pass the folder that holds them with --data-root"


def _read_rows(csv_path: Path) -> list[dict[str, str]]:
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such file list (a CSV with columns path,category,split)")
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise DataError(
                    f"{csv_path}: missing column(s) {', '.join(missing)}; found "
                    f"{columns or 'no header'}. A file list needs a header line 'path,category,split' "
                    "(category and split may be empty)"
                )
            reader.fieldnames = columns
            return list(reader)
    except UnicodeDecodeError as e:
        raise DataError(f"{csv_path}: not a UTF-8 text CSV ({e})") from None
    except csv.Error as e:
        raise DataError(f"{csv_path}: malformed CSV ({e})") from None


def _clean(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def splits_of(entries: Iterable[FileEntry]) -> list[str]:
    """The split names present in ``entries``, sorted."""
    return sorted({e.split for e in entries if e.split is not None})


def read_file_list(
    csv_path: str | os.PathLike,
    splits: str | Iterable[str] | None = None,
    root: str | os.PathLike | None = None,
) -> list[FileEntry]:
    """Read a ``path,category,split`` CSV into :class:`FileEntry` rows.

    Args:
        csv_path: the CSV file.
        splits: keep only rows of these splits (a name, or several); ``None`` keeps all.
        root: folder that relative paths resolve against (default: see the module docstring).

    Raises:
        DataError: the CSV is missing or malformed, a split name is unknown (the message
            lists the ones present), nothing is selected, or none of the files exists.
    """
    csv_path = Path(csv_path)
    rows = _read_rows(csv_path)
    explicit = root is not None
    base = Path(root).expanduser() if explicit else default_root(csv_path)

    entries = []
    for line, row in enumerate(rows, start=2):
        rel = _clean(row.get("path"))
        if rel is None:
            raise DataError(f"{csv_path}, line {line}: empty path")
        p = Path(rel).expanduser()
        entries.append(FileEntry(p if p.is_absolute() else base / p,
                                 _clean(row.get("category")), _clean(row.get("split"))))

    if splits is not None:
        wanted = [splits] if isinstance(splits, str) else list(splits)
        present = splits_of(entries)
        unknown = [s for s in wanted if s not in present]
        if unknown:
            raise DataError(
                f"{csv_path}: unknown split(s) {', '.join(map(repr, unknown))}; the file has "
                f"{', '.join(present) if present else 'no split column values'}"
            )
        keep = set(wanted)
        entries = [e for e in entries if e.split in keep]
    if not entries:
        raise DataError(f"{csv_path}: no rows selected (empty file list)")

    if not any(e.path.is_file() for e in entries):
        folder = "" if base.is_dir() else " (that folder does not exist)"
        raise DataError(
            f"{csv_path}: none of its {len(entries)} listed images exists under {base}{folder} "
            f"(first: {entries[0].path}); {_hint(csv_path, explicit)}"
        )
    return entries


def find_images(source: str | os.PathLike, splits: Iterable[str] | None = None,
                root: str | os.PathLike | None = None) -> list[Path]:
    """The image paths of ``source``: a folder (recursive, sorted, the one folder rule of
    :func:`~dinoserve.images.walk_images`) or a CSV file list (rows of ``splits`` only, when
    given). Training, the index, int8 calibration and the demo all read their data this way.

    Raises:
        DataError: ``source`` is missing, a file other than a CSV, a folder given ``splits``,
            or holds no images.
    """
    path = Path(source).expanduser()
    splits = list(splits) if splits else None
    if not path.exists():
        raise DataError(f"{path}: no such folder or file list; pass an image folder or a .csv file list")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"{path}: a file that is not a .csv file list; pass a folder of images or a CSV")
        paths = [e.path for e in read_file_list(path, splits=splits, root=root)]
        where = f"{path} (splits {', '.join(splits)})" if splits else str(path)
    else:
        if splits:
            raise DataError(f"--split applies to CSV file lists only, but {path} is a folder")
        paths, where = walk_images(path), str(path)
    if not paths:
        raise DataError(f"{where}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return paths
