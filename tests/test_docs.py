"""The documentation says what the command line accepts.

For README.md and every page of docs/:

- every ``flexbert ...`` command in a fenced shell block parses as ``flexbert`` parses it
  (``python main.py RECIPE`` and ``composer ... main.py RECIPE`` are ``flexbert train RECIPE``);
- every option of an inline ``flexbert <command> ... --flag`` mention, and every inline ``--flag``
  on its own, is an option of flexbert (of that command, where one is named);
- every relative link leads to a file that exists, and every ``#anchor`` to a heading there;
- README links every docs page.

Commands are found by reading the shell, never by a list of known commands: placeholders such as
RECIPE or $NODE_RANK are strings to argparse, so the documented commands must parse as written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flexbert.cli import COMMANDS, MissingExtraError, build_parser, parse_args

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "zsh"}
SEPARATORS = {";", "&&", "||", "|"}
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@dataclass
class Block:
    language: str
    lines: list[tuple[int, str]]  # (line number, text)


def split_fences(text: str) -> tuple[list[Block], list[tuple[int, str]]]:
    """The fenced code blocks of a Markdown page, and its other lines, each with its line number."""
    blocks: list[Block] = []
    prose: list[tuple[int, str]] = []
    open_fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(line)
        if open_fence is None:
            if fence:
                open_fence = fence.group(1)
                blocks.append(Block(fence.group(2).lower(), []))
            else:
                prose.append((number, line))
        elif fence and fence.group(1).startswith(open_fence) and not fence.group(2):
            open_fence = None
        else:
            blocks[-1].lines.append((number, line))
    return blocks, prose


def strip_comment(line: str) -> str:
    """``line`` without a shell comment: a ``#`` outside quotes that starts the line or follows white space."""
    quote = None
    escaped = False
    for i, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def shell_lines(block: Block) -> Iterator[tuple[int, str, list[str] | None]]:
    """The logical lines of a shell block (joined over trailing backslashes and quotes left open),
    each with the number of its first line, its text and its words (None where the shell would not
    read it)."""
    lines = block.lines
    i = 0
    while i < len(lines):
        start, text = lines[i][0], strip_comment(lines[i][1])
        while True:
            if text.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text.rstrip()[:-1] + " " + strip_comment(lines[i][1])
                continue
            try:
                words = shlex.split(text)
            except ValueError:  # a quote left open: the string goes on on the next line
                if i + 1 < len(lines):
                    i += 1
                    text = text + "\n" + lines[i][1]
                    continue
                words = None
            break
        yield start, text.strip(), words
        i += 1


def segments(words: list[str]) -> Iterator[list[str]]:
    """The simple commands of a shell line, split at ``;``, ``&&``, ``||`` and ``|``."""
    current: list[str] = []
    for word in words:
        if word in SEPARATORS:
            yield current
            current = []
        else:
            current.append(word)
    yield current


def flexbert_argv(words: list[str]) -> list[str] | None:
    """The arguments that ``flexbert`` gets from a simple command (without the word ``flexbert``), or
    None when it runs no flexbert command. ``main.py`` runs ``flexbert train``."""
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    for i, word in enumerate(words):
        if "://" in word:
            continue
        name = word.rsplit("/", 1)[-1]
        if name == "flexbert" and "install" not in words[:i]:  # not `pip install flexbert`
            return words[i + 1 :]
        if name == "main.py":
            return ["train", *words[i + 1 :]]
        if word == "-m" and i + 1 < len(words) and words[i + 1] in ("flexbert", "flexbert.cli"):
            return words[i + 2 :]
    return None


def parse_error(argv: list[str]) -> str | None:
    """What ``flexbert`` says about ``argv`` if it refuses it, else None."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parse_args(argv)
    except SystemExit as stop:
        said = stderr.getvalue().strip()
        if stop.code not in (0, None):  # --help exits 0
            return said.splitlines()[-1] if said else f"exit status {stop.code}"
    except MissingExtraError:
        return None  # this install cannot load the command: its options cannot be checked here
    return None


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parsers of ``parser``'s subcommands, by name (none for a command without any)."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def known_options(argv: list[str]) -> tuple[set[str], str]:
    """The options of the command that ``argv`` names (of its step, for ``prepare mds``), and that
    command's name."""
    parser = build_parser(argv[:1])
    options: set[str] = set()
    path = ["flexbert"]
    rest = list(argv)
    while True:
        options.update(option for action in parser._actions for option in action.option_strings)
        positionals = [word for word in rest if not word.startswith("-")]
        chosen = subcommands(parser).get(positionals[0]) if positionals else None
        if chosen is None:
            return options, " ".join(path)
        parser = chosen
        path.append(positionals[0])
        rest = rest[rest.index(positionals[0]) + 1 :]


def unknown_flags(argv: list[str]) -> list[str]:
    """What is wrong with the command that ``argv`` names and the options it gives, if anything."""
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        return [f"no such command: {argv[0]!r}"]
    try:
        options, command = known_options(argv)
    except MissingExtraError:
        return []  # this install cannot load the command: its options cannot be checked here
    flags = [word.split("=", 1)[0] for word in argv if re.match(r"^--?[A-Za-z]", word)]
    return [f"{flag} is not an option of {command}" for flag in flags if flag not in options]


def all_options() -> set[str]:
    """Every option of every flexbert command (and of every step of ``prepare``)."""
    options: set[str] = set()
    for name in COMMANDS:
        try:
            parsers = [build_parser([name])]
        except MissingExtraError:
            continue
        while parsers:
            parser = parsers.pop()
            options.update(option for action in parser._actions for option in action.option_strings)
            parsers += subcommands(parser).values()
    return options


def inline_code(prose: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """The inline code spans of a page's prose (which may wrap over lines), with their line numbers."""
    text = "\n".join(line for _, line in prose)
    numbers = [number for number, _ in prose]
    for match in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", text, flags=re.DOTALL):
        line = numbers[text.count("\n", 0, match.start())]
        yield line, " ".join(match.group(2).split())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    _, prose = split_fences(page.read_text())
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose:
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(page: Path) -> Iterator[tuple[int, str]]:
    _, prose = split_fences(page.read_text())
    for number, line in prose:
        for match in re.finditer(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
            yield number, match.group(1)


def fenced_commands(page: Path) -> Iterator[tuple[int, str, list[str] | None]]:
    """Each flexbert command in the page's shell blocks: its line number, the shell line, and the
    arguments flexbert gets (None where the shell could not read a line that names flexbert)."""
    blocks, _ = split_fences(page.read_text())
    for block in blocks:
        if block.language not in SHELL_LANGUAGES:
            continue
        for number, text, words in shell_lines(block):
            if words is None:
                if "flexbert" in text or "main.py" in text:
                    yield number, text, None
                continue
            for segment in segments(words):
                argv = flexbert_argv(segment)
                if argv is not None:
                    yield number, text, argv


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_fenced_commands_parse(page):
    problems = []
    for number, text, argv in fenced_commands(page):
        error = "the shell cannot read this line" if argv is None else parse_error(argv)
        if error:
            problems.append(f"{page_id(page)}:{number}: {text}: {error}")
    assert not problems, "\n".join(problems)


def test_the_pages_show_commands():
    """The parsing above found the commands that the pages show (it would pass on none)."""
    found = {page_id(page): sum(1 for _ in fenced_commands(page)) for page in PAGES}
    assert found["README.md"] >= 4, found
    assert sum(found.values()) >= 20, found


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_inline_flags_are_options(page):
    _, prose = split_fences(page.read_text())
    every_option = None
    problems = []
    for number, span in inline_code(prose):
        try:
            words = shlex.split(span)
        except ValueError:
            words = span.split()
        if not words:
            continue
        argv = flexbert_argv(words)
        if argv is None and words[0] in COMMANDS and len(words) > 1:
            argv = words  # `prepare mds --part I/N`: a command named without the word flexbert
        if argv is not None:
            problems += [f"{page_id(page)}:{number}: `{span}`: {problem}" for problem in unknown_flags(argv)]
        elif re.match(r"^--[A-Za-z]", words[0]):
            every_option = all_options() if every_option is None else every_option
            flag = words[0].split("=", 1)[0]
            if flag not in every_option:
                problems.append(f"{page_id(page)}:{number}: `{span}`: {flag} is not an option of any flexbert command")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_lead_somewhere(page):
    problems = []
    for number, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            problems.append(f"{page_id(page)}:{number}: link to {target}: {path} does not exist")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{page_id(page)}:{number}: link to {target}: no heading #{anchor} in {path or page.name}")
    assert not problems, "\n".join(problems)


def test_readme_links_every_docs_page():
    linked = {
        (README.parent / target.partition("#")[0]).resolve()
        for _, target in links(README)
        if target.startswith("docs/")
    }
    pages = {page.resolve() for page in DOCS.glob("*.md")}
    assert pages, "docs/ holds no page"
    missing = sorted(page.name for page in pages - linked)
    assert not missing, f"README.md links no docs/{', docs/'.join(missing)}"
    dangling = sorted(str(path.relative_to(ROOT)) for path in linked - pages)
    assert not dangling, f"README.md links pages that do not exist: {', '.join(dangling)}"
