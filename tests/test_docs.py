"""The Markdown documents point at what exists: every relative link (and its #anchor) resolves, and the record files
docs/results/camvid.md names for its record folders are in them."""

from __future__ import annotations

import os
import re
from pathlib import Path

from conftest import ROOT

RESULTS = ROOT / "docs" / "results"
SKIPPED = {"runs", "build", "dist"}
FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    """The repository's Markdown files (not those of hidden folders such as .venv, run folders or build outputs)."""
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [name for name in subfolders
                         if not name.startswith(".") and name not in SKIPPED and not name.endswith(".egg-info")]
        found += [Path(folder) / name for name in files if name.endswith(".md")]
    return sorted(found)


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file (lower case, punctuation but '-' and '_' dropped,
    spaces as '-', '-1', '-2', ... for repeated headings)."""
    found, seen, in_code = set(), {}, False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        heading = None if in_code else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            repeat = seen.get(slug, 0)
            seen[slug] = repeat + 1
            found.add(slug if repeat == 0 else f"{slug}-{repeat}")
    return found


def prose(path: Path) -> str:
    """A Markdown file without its fenced code blocks."""
    kept, in_code = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            kept.append(line)
    return "\n".join(kept)


def test_anchors_follow_githubs_rules(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Real images: CamVid\n## `csl analyze` (selection)\n## Notes\n## Notes\n"
                    "```\n# not a heading\n```\n")
    assert anchors(page) == {"real-images-camvid", "csl-analyze-selection", "notes", "notes-1"}


def test_relative_links_and_anchors_resolve():
    broken = []
    for path in markdown_files():
        for target in LINK.findall(prose(path)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}: {target}"
            if not linked.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{where} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_camvid_record_files_named_are_in_their_folders():
    """After a link to a record folder (``[`camvid/seed0/`](camvid/seed0/) (`summary.json`, every run's
    `metrics_<run>.jsonl` ...)``), each file named in the same paragraph up to the next folder link is in that folder
    (``<run>`` and ``*`` stand for any part of a name); a name with a folder (``camvid/seed1/metrics_csl.jsonl``) is
    read from docs/results/."""
    text = prose(RESULTS / "camvid.md")
    pieces = re.split(r"\[`?(camvid/[^`\]]+/)`?\]\(camvid/[^)]+\)", text)
    missing, checked = [], 0
    for folder, following in zip(pieces[1::2], pieces[2::2], strict=True):
        for name in re.findall(r"`([^`\s]+\.(?:json|jsonl|txt|md|log|png))`", following.split("\n\n")[0]):
            if "/" in name and not name.startswith("camvid/"):
                continue
            pattern = re.sub(r"<[^>]+>|\*", "*", name)
            checked += 1
            if not (list(RESULTS.glob(pattern)) if "/" in name else list((RESULTS / folder).glob(pattern))):
                missing.append(f"{folder}: {name}")
    assert checked >= 50
    assert not missing, "\n".join(missing)
