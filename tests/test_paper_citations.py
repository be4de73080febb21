"""Every citation of docs/paper.md in the code and docs points at a section that exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"docs/paper\.md`?,?\s+(?:sections?\s+)?(\d+)(?:\s*(?:-|and)\s*(\d+))?")
EQUATION = re.compile(r"docs/paper\.md[^)\n]*?\(?(?:Eq\.|eq\.)\s*\(?(\d+\.\d+)\)?")


def cited_files() -> list[Path]:
    files = [*ROOT.joinpath("src").rglob("*.py"), *ROOT.joinpath("src").rglob("*.md"),
             *ROOT.joinpath("bench").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py")]
    return [path for path in files if "docs/paper.md" in path.read_text()]


def paper_sections() -> set[int]:
    text = ROOT.joinpath("docs", "paper.md").read_text()
    return {int(number) for number in re.findall(r"^## (\d+)\. ", text, flags=re.MULTILINE)}


def test_every_cited_section_and_equation_exists():
    sections = paper_sections()
    assert sections == set(range(1, 8))
    paper = ROOT.joinpath("docs", "paper.md").read_text()
    files = cited_files()
    assert len(files) > 20  # the citations were found at all
    for path in files:
        text = " ".join(path.read_text().split())  # citations may wrap across lines
        for first, last in CITATION.findall(text):
            for number in range(int(first), int(last or first) + 1):
                assert number in sections, f"{path.relative_to(ROOT)} cites section {number}"
        for equation in EQUATION.findall(text):
            assert f"({equation})" in paper, f"{path.relative_to(ROOT)} cites Eq. {equation}"


def test_readme_points_at_the_paper_notes():
    assert "(docs/paper.md)" in ROOT.joinpath("README.md").read_text()
