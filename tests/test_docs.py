"""The README, CONTRIBUTING.md and docs/*.md work as written.

Their fenced ``bash``/``sh``/``console`` blocks run in a temporary folder whose ``models/NAME`` paths are the
session's tiny exported folders (and ``./my-finetuned-deberta`` the tiny checkpoint), with this interpreter's
``bin`` first on ``PATH`` and a time limit; their ``python`` blocks run page by page, in order, in one namespace
(as a reader types them), in such a folder too, with ``texts``, ``docs``, ``documents`` and ``queries`` defined
as a few sentences. A block that needs a GPU, the network, the model hub, a server or minutes of CPU is skipped by
an HTML comment on the line before it that says why: ``<!-- docs-test: skip (needs a GPU) -->``. A block that runs
an export, or reads a folder whose fixture the quick tier does not build (``_SLOW_FIXTURES``), runs in the slow tier
(``-m slow``); a page's python blocks of that kind run there on their own, in order, in a namespace of their own.

Whether run or not, every ``deberta-onnx COMMAND --flag`` in a shell block or an inline code span must be a flag
of that command's parser, and every relative link must reach a file and, for a page, a heading of it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "console"}
RUN_LANGS = SHELL | {"python"}
TIMEOUT_S = 600  # an export in a process of its own: 20 to 30 s on a quiet 2-core machine, minutes on a busy one

_FENCE = re.compile(r"^(\s*)(```+)\s*([\w+-]*)")
_MARKER = re.compile(r"^\s*<!-- docs-test: skip \((?P<reason>[^)]*(?:\([^)]*\)[^)]*)*)\) -->\s*$")
_MODEL = re.compile(r"(?<![\w./-])models/([\w.-]+)")
_EXPORT_OUT = re.compile(r"deberta-onnx export\s+\S+\s+models/([\w.-]+)")
_INLINE = re.compile(r"(?<!`)`(deberta-onnx [^`]+)`(?!`)")
_LINK = re.compile(r"\]\(([^)\s]+)\)")

# Names standing in the docs for model folders of another task than embedding, and the fixture holding one.
_FOLDER_FIXTURES = {"nli": "nli", "reranker": "reranker", "ner": "ner", "my-sbert": "sbert", "squad2": "qa",
                    "swag": "multiple_choice", "deberta-base-mlm": "fill_mask"}
# Fixtures that cost an export no quick test needs otherwise: the blocks reading them run in the slow tier.
_SLOW_FIXTURES = {"multiple_choice", "fill_mask"}
# Checkpoint folders the docs export from, and the fixture holding one.
_SOURCE_FIXTURES = {"my-finetuned-deberta": "tiny_checkpoint"}

PRELUDE_TEXTS = ["Trains leave from platform 4.", "Bananas are yellow.", "The museum opens at nine.",
                 "A sentence about the weather.", "Zürich is lovely in spring."]


@dataclass(frozen=True)
class Block:
    page: Path
    line: int      # of the opening fence, 1-based
    lang: str
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, with the skip reason of the comment right before each (blank lines between
    them allowed)."""
    lines = page.read_text(encoding="utf-8").split("\n")
    found: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = match.groups()
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1
        before = start - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        marker = _MARKER.match(lines[before]) if before >= 0 else None
        found.append(Block(page, start + 1, lang, "\n".join(body) + "\n", marker["reason"] if marker else None))
    return found



def _prose(page: Path) -> list[str]:
    """The page's lines with those of fenced blocks (fences included) blanked, so that line numbers hold."""
    lines = page.read_text(encoding="utf-8").split("\n")
    fence: str | None = None
    for number, line in enumerate(lines):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match[2]
            lines[number] = ""
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
            lines[number] = ""
    return lines

ALL_BLOCKS = [block for page in PAGES for block in _blocks(page)]
RUN_SHELL = [block for block in ALL_BLOCKS if block.lang in SHELL and block.skip is None]
RUN_PYTHON_PAGES = sorted({block.page for block in ALL_BLOCKS if block.lang == "python" and block.skip is None})


def _slow(block: Block) -> bool:
    """Whether ``block`` runs an export, or reads a model folder whose fixture is an export of its own."""
    read = set(_MODEL.findall(block.code)) - set(_EXPORT_OUT.findall(block.code))
    return "deberta-onnx export" in block.code or any(_FOLDER_FIXTURES.get(name) in _SLOW_FIXTURES for name in read)


def _slow_if_exporting(block: Block) -> Any:
    marks = [pytest.mark.slow] if _slow(block) else []
    return pytest.param(block, id=block.id, marks=marks)


def _python_pages() -> list[Any]:
    """Each page with python blocks to run: its quick blocks, and (marked slow) its slow ones, if any."""
    params = []
    for page in RUN_PYTHON_PAGES:
        blocks = [block for block in _blocks(page) if block.lang == "python" and block.skip is None]
        name = str(page.relative_to(ROOT))
        if any(not _slow(block) for block in blocks):
            params.append(pytest.param(page, False, id=name))
        if any(_slow(block) for block in blocks):
            params.append(pytest.param(page, True, id=f"{name} (slow blocks)", marks=pytest.mark.slow))
    return params


def _workdir(request: pytest.FixtureRequest, tmp_path: Path, code: str) -> Path:
    """``tmp_path`` with the model folders and checkpoints that ``code`` reads, as links to the session's."""
    written = set(_EXPORT_OUT.findall(code))
    for name in sorted(set(_MODEL.findall(code)) - written):
        fixture = _FOLDER_FIXTURES.get(name)
        folder = request.getfixturevalue(fixture)[1] if fixture else request.getfixturevalue("tiny_model")
        (tmp_path / "models").mkdir(exist_ok=True)
        (tmp_path / "models" / name).symlink_to(folder, target_is_directory=True)
    for name, fixture in _SOURCE_FIXTURES.items():
        if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", code):
            (tmp_path / name).symlink_to(request.getfixturevalue(fixture), target_is_directory=True)
    return tmp_path


def test_skip_markers_are_well_formed_and_attached() -> None:
    """A mistyped marker would run a block meant to be skipped; one that is not right before a block skips
    nothing; a marker without a reason hides why."""
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").split("\n")
        for number, line in enumerate(_prose(page), 1):
            if "docs-test" not in line or "`" in line:
                continue
            where = f"{page.relative_to(ROOT)}:{number}"
            match = _MARKER.match(line)
            assert match and match["reason"].strip(), f"{where}: write `<!-- docs-test: skip (why) -->`: {line!r}"
            after = next((next_line for next_line in lines[number:] if next_line.strip()), "")
            assert _FENCE.match(after), f"{where}: the skip marker is not right before a fenced block"
    assert RUN_SHELL and RUN_PYTHON_PAGES, "no block is run: the parser or the markers are wrong"


@pytest.mark.parametrize("block", [_slow_if_exporting(block) for block in RUN_SHELL])
def test_shell_block_runs(block: Block, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    cwd = _workdir(request, tmp_path, block.code)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, (f"{block.id} failed ({result.returncode}):\n{block.code}\n"
                                    f"{result.stdout}\n{result.stderr}")
    for name in _EXPORT_OUT.findall(block.code):  # an export the block runs leaves a complete folder
        assert (cwd / "models" / name / "manifest.json").is_file(), f"{block.id}: models/{name} was not written"


@pytest.mark.parametrize(("page", "slow"), _python_pages())
def test_python_blocks_run(page: Path, slow: bool, request: pytest.FixtureRequest, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    blocks = [block for block in _blocks(page)
              if block.lang == "python" and block.skip is None and _slow(block) == slow]
    cwd = _workdir(request, tmp_path, "".join(block.code for block in blocks))
    namespace: dict[str, Any] = {"__name__": "__docs__", "texts": list(PRELUDE_TEXTS), "docs": list(PRELUDE_TEXTS),
                                 "documents": list(PRELUDE_TEXTS), "queries": ["where is my train?", "fruit"]}
    before = Path.cwd()
    os.chdir(cwd)
    try:
        for block in blocks:
            try:
                exec(compile(block.code, block.id, "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"{block.id} failed: {error!r}\n{block.code}") from error
    finally:
        os.chdir(before)
    capsys.readouterr()


def _command_flags() -> dict[str, set[str]]:
    from deberta_onnx.runtime.cli import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    flags = {name: set(sub._option_string_actions) for name, sub in commands.choices.items()}
    flags[""] = set(parser._option_string_actions)
    return flags


def _invocations(text: str) -> list[str]:
    """Each ``deberta-onnx ...`` command in shell text: continuation lines joined, comments dropped, split at
    ``&&``, ``||``, ``|`` and ``;``."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in joined.split("\n"):
        for part in re.split(r"&&|\|\||;|\s\|\s", re.sub(r"(^|\s)#.*$", "", line)):
            if part.strip().startswith("deberta-onnx"):
                found.append(part.strip())
    return found


def test_every_documented_flag_exists() -> None:
    """``deberta-onnx COMMAND --flag`` in any shell block (run or skipped) or inline code span is a flag that the
    command's parser accepts, spelled out in full: a renamed or removed flag fails here."""
    flags = _command_flags()
    problems = []
    checked = 0
    for page in PAGES:
        sources = [(block.id, block.code) for block in _blocks(page) if block.lang in SHELL]
        prose = "\n".join(_prose(page))
        sources += [(f"{page.relative_to(ROOT)} (inline)", " ".join(span.split())) for span in _INLINE.findall(prose)]
        for where, code in sources:
            for command in _invocations(code):
                words = command.split()
                sub = words[1] if len(words) > 1 and not words[1].startswith("-") else ""
                if sub.isupper():  # a placeholder: `deberta-onnx COMMAND --help`
                    continue
                if sub not in flags:
                    problems.append(f"{where}: `deberta-onnx {sub}` is not a command ({command!r})")
                    continue
                for flag in re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", command):
                    checked += 1
                    if flag not in flags[sub]:
                        problems.append(f"{where}: `deberta-onnx {sub}` has no flag {flag}")
    assert not problems, "\n".join(problems)
    assert checked > 50, f"only {checked} flags found: the extraction is broken"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(page):
        if not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_relative_links_resolve() -> None:
    problems = []
    for page in [*PAGES, ROOT / "benchmarks" / "README.md"]:
        for target in _LINK.findall("\n".join(_prose(page))):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not resolved.exists():
                problems.append(f"{where}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                problems.append(f"{where}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


def test_the_readme_is_a_front_door() -> None:
    """Short, and holding CI's test command verbatim (`.ci/run` runs the same line)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    assert ("python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt torch==2.13.0 && pip "
            "install -c constraints.txt -e '.[export,dev,langchain,chroma,llamaindex,ray]' && pytest -q -n 2 "
            "--dist loadfile") in readme
