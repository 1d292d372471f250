"""The Markdown documents point at what exists: every relative link (and its #anchor) resolves, and the record files
docs/results/camvid.md names for its record folders are in them."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
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


DOCUMENTS = ("README.md", "docs/unimatch.md", "docs/selection.md", "docs/results/camvid.md", "csl_bench/README.md",
             "csl/splits/README.md")
CSL_COMMAND = re.compile(r"(?:^|\s)(?:csl|-m csl)\s+(train|eval|predict|analyze|demo|split|report)\b(.*)", re.S)
MODULE_COMMAND = re.compile(r"(?:^|\s)-m\s+((?:csl_bench|csl_kernels)[\w.]*)(.*)", re.S)
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


class _Parsed(Exception):
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def option_strings(main, monkeypatch) -> set[str]:
    """The options of the parser that ``main`` builds (stopped at its ``parse_args``, before it does anything)."""
    import argparse

    def stop(parser, *args, **kwargs):
        raise _Parsed(parser)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", stop)
        try:
            main([])
        except _Parsed as parsed:
            return {option for action in parsed.parser._actions for option in action.option_strings}
    raise AssertionError(f"{main} parsed no arguments")


def documented_commands() -> list[tuple[str, str]]:
    """(document, command text) for every code line and inline code span of the documents, comments cut off."""
    found = []
    for name in DOCUMENTS:
        text = (ROOT / name).read_text()
        blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)
        lines = [line for block in blocks for line in block.splitlines()]
        spans = re.findall(r"`([^`]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
        found += [(name, re.sub(r"\s#.*", "", command)) for command in lines + spans]
    return found


def test_the_documented_command_line_options_exist(monkeypatch):
    """Every ``--option`` written after ``csl <command>`` or ``python -m <csl_bench / csl_kernels module>`` in the
    documents is an option of that command's parser."""
    import argparse
    import importlib

    from csl.cli import _parser

    subparsers = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    csl_options = {name: {option for action in sub._actions for option in action.option_strings}
                   for name, sub in subparsers.choices.items()}
    module_options: dict[str, set[str]] = {}
    unknown, checked = [], 0
    for document, command in documented_commands():
        for match in CSL_COMMAND.finditer(command):
            for flag in FLAG.findall(match.group(2)):
                checked += 1
                if flag not in csl_options[match.group(1)]:
                    unknown.append(f"{document}: csl {match.group(1)} {flag}")
        for match in MODULE_COMMAND.finditer(command):
            module = match.group(1)
            if module not in module_options:
                loaded = importlib.import_module(module if module != "csl_bench" else "csl_bench.__main__")
                main = loaded.SPEC.main if hasattr(loaded, "SPEC") else loaded.main
                module_options[module] = option_strings(main, monkeypatch)
            for flag in FLAG.findall(match.group(2).split(" | ")[0]):
                checked += 1
                if flag not in module_options[module]:
                    unknown.append(f"{document}: python -m {module} {flag}")
    assert checked >= 100 and len(module_options) >= 8
    assert not unknown, "\n".join(unknown)


def test_the_documented_environment_variables_are_read():
    """Every ``CSL_*`` / ``GPU_CHECK_*`` variable the documents name, and every setting given to a script as
    ``NAME=value bash scripts/<script>.sh``, is read by the code or by that script."""
    sources = [ROOT / "setup.py"] + [path for folder in ("csl", "csl_kernels", "csl_bench", "csrc", "scripts")
                                     for path in (ROOT / folder).rglob("*")
                                     if path.suffix in (".py", ".sh", ".h", ".cpp", ".cu", ".cuh")]
    code = "\n".join(path.read_text(errors="replace") for path in sources)
    missing, checked = [], 0
    for name in DOCUMENTS:
        text = (ROOT / name).read_text()
        for variable in sorted(set(re.findall(r"\b((?:CSL|GPU_CHECK)_[A-Z0-9_]*[A-Z0-9])\b", text))):
            checked += 1
            if not re.search(rf"\b{variable}\b", code):
                missing.append(f"{name}: {variable}")
        for settings, script in re.findall(r"((?:\b[A-Z][A-Z0-9_]*=\S+\s+)+)bash (scripts/\w+\.sh)", text):
            source = (ROOT / script).read_text()
            for variable in re.findall(r"\b([A-Z][A-Z0-9_]*)=", settings):
                checked += 1
                if "${" + variable not in source and f"${variable}" not in source:
                    missing.append(f"{name}: {variable} for {script}")
    assert checked >= 30
    assert not missing, "\n".join(missing)


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_the_readme_op_table_is_the_api():
    """README's table of ops: each is exported by csl_kernels, its arguments are the function's parameters in that
    order, and every ``name=default`` (the first choice where it lists several) is the function's default; the ops it
    calls reference-only take no ``backend=``, the others do, with ``"auto"`` as the default."""
    import ast
    import inspect

    import csl_kernels

    text = _readme()
    rows = re.findall(r"^\| `(\w+)\((.*?)\)` \|", text, flags=re.M)
    assert len(rows) == 8
    reference_only = re.search(r"Every op but `(\w+)` and `(\w+)` \(reference only\) takes `backend=`", text).groups()
    for op, arguments in rows:
        parameters = inspect.signature(getattr(csl_kernels, op)).parameters
        names = list(parameters)
        position = -1
        for argument in arguments.replace("\\|", "|").split(", "):
            name, _, default = argument.partition("=")
            assert name in parameters, f"{op}: {name}"
            assert names.index(name) > position, f"{op}: {name} out of order"
            position = names.index(name)
            default = default.split(" | ")[0]
            if default and default != "...":
                assert parameters[name].default == ast.literal_eval(default), f"{op}: {argument}"
        if op in reference_only:
            assert "backend" not in parameters, op
        else:
            assert parameters["backend"].default == "auto", op


def test_the_readme_python_example_runs():
    """README's code block for your own trainer, run on small UniMatch-shaped tensors (reference backend, as
    CSL_BACKEND names it for every auto call): the selection's outputs, a loss with its gradient, the masked images."""
    import torch

    block = re.search(r"^```python\n(.*?)^```", _readme(), flags=re.S | re.M).group(1)
    assert "ck.pcos_weights(" in block and "ck.trusted_mask(" in block
    generator = torch.Generator().manual_seed(0)
    ignore = torch.zeros(2, 12, 10, dtype=torch.long)
    ignore[1, -3:] = 255
    names = {"logits_weak": torch.randn(2, 5, 12, 10, generator=generator) * 3,
             "logits_strong": torch.randn(2, 5, 12, 10, generator=generator).requires_grad_(),
             "ignore": ignore, "images_mild": torch.randn(2, 3, 12, 10, generator=generator),
             "gen": torch.Generator().manual_seed(1)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CSL_BACKEND", "reference")
        exec(compile(block, "README.md", "exec"), names)
    sel, loss_u, masked, cover = names["sel"], names["loss_u"], names["masked"], names["cover"]
    assert sel.weight.dtype == torch.float32 and sel.label.dtype == torch.int64 and sel.reliable.dtype == torch.bool
    assert (sel.weight[ignore == 255] == 0).all() and sel.reliable.any()
    loss_u.backward()
    assert loss_u.ndim == 0 and names["logits_strong"].grad.abs().sum() > 0
    hidden = cover.unsqueeze(1).expand_as(masked)
    assert cover.any() and not (cover & ~sel.reliable).any()
    assert (masked[hidden] == 0).all() and torch.equal(masked[~hidden], names["images_mild"][~hidden])


def test_the_readme_camvid_table_is_the_records_means():
    """README's CamVid table is the mean rows of scripts/camvid_overview.py's table over the committed records (the
    same columns, without the paired difference), and the run-by-run range of CSL minus threshold it gives in words is
    the records' (rounded as the table rounds)."""
    from conftest import load_script

    overview = load_script("camvid_overview")
    finals = overview.load()
    means = [line for line in overview.table(finals).splitlines() if ", mean |" in line]
    text = _readme()
    documented = text[text.index("| split | warm-up | supervised only |"):]
    documented = documented[:documented.index("\n\n")].splitlines()[2:]
    assert len(documented) == len(means) == 2
    for row, mean in zip(documented, means, strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        expected = [cell.strip() for cell in mean.strip("|").split("|")][:-1]  # without "CSL minus threshold"
        assert [cells[0] + ", mean"] + cells[1:] == expected
    paired = sorted(run["csl"] - run["threshold"] for run in finals.values())
    low, high = re.search(r"CSL minus threshold \S+ and \S+ points on average, (\S+) to (\S+) run by\s+run",
                          text).groups()
    assert (float(low), float(high)) == (round(paired[0], 1), round(paired[-1], 1))
