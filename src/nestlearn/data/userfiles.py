"""The user's own text: a folder of ``.txt``/``.md`` files or a single text file.

- A folder: every ``*.txt`` and ``*.md`` file below it (recursively, hidden files skipped) is
  one document, keyed by its path relative to the folder.
- A single file: documents are separated by blank lines (lines holding only whitespace); each
  is keyed by its own text, so identical paragraphs share a split.

Files are read as UTF-8 (an optional byte-order mark is dropped) and Windows line endings are
turned into ``\\n``.
"""

from __future__ import annotations

import re
from pathlib import Path

from nestlearn.data.documents import Document
from nestlearn.errors import NestlearnError

TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".md")
_BLANK_LINES = re.compile(r"\n[ \t]*\n\s*")


def read_text_file(path: Path) -> str:
    """The UTF-8 text of ``path`` (a BOM is dropped); unreadable files fail in one line."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise NestlearnError(f"{path}: not UTF-8 text ({err}); allowed: UTF-8 files") from err
    except OSError as err:
        raise NestlearnError(f"{path}: cannot read ({err.strerror})") from err
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_blank_lines(text: str) -> list[str]:
    """Blank-line separated documents, each stripped and ending with one newline."""
    return [part.strip() + "\n" for part in _BLANK_LINES.split(text) if part.strip()]


def load_path(path: Path) -> list[Document]:
    """Documents of a text file or a folder of text files (see the module docstring)."""
    if path.is_dir():
        files = sorted(
            file for file in path.rglob("*")
            if file.is_file() and file.suffix.lower() in TEXT_SUFFIXES
            and not any(part.startswith(".") for part in file.relative_to(path).parts)
        )
        if not files:
            raise NestlearnError(
                f"corpus: folder {str(path)!r} has no .txt or .md files; "
                "allowed: a folder holding at least one"
            )
        documents = []
        for file in files:
            text = read_text_file(file).strip()
            if text:
                documents.append(Document(key=file.relative_to(path).as_posix(), text=text + "\n"))
        if not documents:
            raise NestlearnError(f"corpus: folder {str(path)!r} holds only empty .txt or .md "
                                 "files; allowed: a folder with some text")
        return documents
    if path.is_file():
        parts = split_blank_lines(read_text_file(path))
        if not parts:
            raise NestlearnError(f"corpus: file {str(path)!r} is empty (no text); allowed: a "
                                 "UTF-8 text file of blank-line separated documents")
        return [Document(key=part, text=part) for part in parts]
    if path.exists():
        # /dev/null, a pipe, a socket: nothing a corpus can be read from twice
        raise NestlearnError(f"corpus: {str(path)!r} is not a regular file or folder (a "
                             "device, pipe or socket); allowed: a text file or a folder of "
                             ".txt/.md files")
    raise NestlearnError(f"corpus: path {str(path)!r} does not exist")
