"""Files as users save them: text tables (JSONL, CSV) and class folders, read by the builder and the evaluator.

Tables are UTF-8, with or without the byte-order mark Excel's "CSV UTF-8" writes. Other encodings are
not guessed (a cp1252 and a latin-1 reading of the same bytes both succeed, with different text): a
line that is not UTF-8 stops the read with one line naming the file, the line and the fix. Lines are
decoded one at a time, so a table of any size streams and the error can name its line.

Folder readers ignore hidden entries (a name starting with ``.``: ``.DS_Store``, macOS ``._x.jpg``
resource forks, ``.ipynb_checkpoints``) and the junk file managers and zip tools leave behind
(``Thumbs.db``, ``desktop.ini``, ``__MACOSX``): none is a class or an image.
"""

from __future__ import annotations

import codecs
import csv
import logging
from collections.abc import Iterator
from pathlib import Path

from medclip.errors import MedclipError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom"}
JUNK_NAMES = {"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx"}
_OTHER_BOMS = [(codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
               (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")]  # UTF-32 LE starts like UTF-16 LE


def _utf8_fix(path: Path) -> str:
    excel = " (Excel: Save As > 'CSV UTF-8')" if path.suffix.lower() == ".csv" else ""
    return f"save it as UTF-8{excel}"


def _decoded(path: Path, number: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start:exc.start + 1]
        guess = bad.decode("cp1252", errors="replace")
        raise MedclipError(f"{path}:{number}: byte 0x{bad.hex()} at column {exc.start + 1} is not UTF-8 "
                           f"(in cp1252/latin-1 it would be {guess!r}): {_utf8_fix(path)}") from None


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, text with its line ending) of a UTF-8 text file, byte-order mark dropped."""
    path = Path(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1:
                for bom, name in _OTHER_BOMS:
                    if raw.startswith(bom):
                        raise MedclipError(f"{path} is {name} text: {_utf8_fix(path)}")
                raw = raw.removeprefix(codecs.BOM_UTF8)
            yield number, _decoded(path, number, raw)


def csv_rows(path: str | Path, need: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line the row starts on, row by column name) of a CSV file; ``need`` is a column it must have."""
    path = Path(path)
    read: list[tuple[int, str]] = []  # every physical line the csv reader has taken, for the row numbers
    lines = text_lines(path)
    reader = csv.DictReader(read.append(item) or item[1] for item in lines)
    try:
        columns = reader.fieldnames or []
        if need is not None and need not in columns:
            shown = ", ".join(map(repr, columns)) or "none"
            raise MedclipError(f"{path} has no {need!r} column (its columns: {shown})")
        taken = len(read)
        for row in reader:  # blank lines before a row are skipped by the reader: the row starts after them
            yield next((n for n, line in read[taken:] if line.strip()), read[-1][0]), row
            taken = len(read)
    except csv.Error as exc:
        raise MedclipError(f"{path}:{read[-1][0] if read else 1}: not a readable CSV row: {exc}") from None


def is_junk(path: Path) -> bool:
    """A hidden file or folder, or one a file manager or zip tool left behind."""
    return path.name.startswith(".") or path.name.lower() in JUNK_NAMES


def class_folders(root: Path) -> list[Path]:
    """The visible subfolders of ``root``, sorted: one per class."""
    folders, ignored = [], []
    for p in sorted(root.iterdir()):
        if p.is_dir():
            (ignored if is_junk(p) else folders).append(p)
    if ignored:
        log.info("%s: ignored hidden or junk folder(s) %s", root, ", ".join(p.name for p in ignored))
    return folders


def folder_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (any depth), sorted, none inside a hidden or junk folder or itself one."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(is_junk(Path(part)) for part in p.relative_to(folder).parts))
