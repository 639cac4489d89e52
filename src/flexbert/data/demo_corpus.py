"""A small three-source corpus built offline from what any Python installation already holds.

- ``code``: the standard library's Python source, one document per file;
- ``science``: docstrings of installed scientific packages, one document per module;
- ``web``: the long descriptions (README prose) in installed packages' ``*.dist-info/METADATA``.

Each source becomes ``OUT/<source>/part-00000.jsonl`` (records ``{"id", "source", "text"}``), and
``OUT/manifest.json`` counts documents and bytes per source. The same environment always yields the
same bytes: files are listed in sorted order and then shuffled with a fixed seed, so that a byte cap
samples the whole source rather than its alphabetical beginning, and documents are taken in that
order until the next one would pass the cap. A document longer than a sixteenth of the cap is
passed over, so that no single huge module fills a source, and so the cap is always nearly filled.
"""

from __future__ import annotations

import ast
import email
import json
import os
import random
import sysconfig
import tokenize
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from flexbert.core.atomic_output import atomic_output_dir
from flexbert.errors import FlexBertError

SCIENCE_PACKAGES = ("numpy", "scipy", "sympy", "mpmath", "networkx", "pandas", "torch")
SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})
MIN_CHARS = 64  # shorter texts are stubs and licence one-liners, not prose or code
MAX_DOCUMENT_SHARE = 16  # no document takes more than 1/16 of a source's bytes
DEFAULT_MAX_BYTES_PER_SOURCE = 3_000_000
SHUFFLE_SEED = 0
PART = "part-00000.jsonl"

T = TypeVar("T")


class DemoCorpusError(FlexBertError, ValueError):
    """The corpus cannot be built as asked (a cap too small, a source with nothing installed)."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True)
class SourceStats:
    documents: int
    bytes: int


def _sampling_order(items: Iterable[T]) -> list[T]:
    order = sorted(items)
    random.Random(SHUFFLE_SEED).shuffle(order)
    return order


def _site_packages() -> list[Path]:
    # The interpreter's own site-packages, not sys.path: the working directory must not change the corpus.
    paths = sysconfig.get_paths()
    return sorted({Path(paths["purelib"]), Path(paths["platlib"])})


def _python_files(root: Path) -> list[Path]:
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if name not in SKIPPED_DIRS]
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    return files


def code_documents() -> Iterator[Document]:
    """The standard library's modules as source text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _sampling_order(_python_files(root)):
        try:
            with tokenize.open(path) as file:  # honours a file's coding declaration
                text = file.read()
        except (SyntaxError, UnicodeDecodeError):
            continue  # undecodable as declared
        yield Document(f"code/{path.relative_to(root).as_posix()}", text)


def module_docstrings(source: str | bytes) -> str:
    """A module's docstring, then each class's and function's docstring headed by its qualified name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old docstrings' invalid escape sequences warn, harmlessly
        tree = ast.parse(source)
    parts = [doc] if (doc := ast.get_docstring(tree)) else []

    def visit(scope: ast.Module | ast.ClassDef, prefix: str) -> None:
        for node in scope.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if doc := ast.get_docstring(node):
                    parts.append(f"{prefix}{node.name}\n{doc}")
                if isinstance(node, ast.ClassDef):
                    visit(node, f"{prefix}{node.name}.")

    visit(tree, "")
    return "\n\n".join(parts)


def science_documents() -> Iterator[Document]:
    """The docstrings of each module of the installed SCIENCE_PACKAGES."""
    files = [
        (site, path)
        for site in _site_packages()
        for package in SCIENCE_PACKAGES
        if (site / package / "__init__.py").is_file()
        for path in _python_files(site / package)
    ]
    for site, path in _sampling_order(files):
        try:
            text = module_docstrings(path.read_bytes())
        except (SyntaxError, ValueError):
            continue  # written for another Python version, or not Python at all
        yield Document(f"science/{path.relative_to(site).as_posix()}", text)


def web_documents() -> Iterator[Document]:
    """Installed packages' long descriptions: the body of METADATA, after its headers."""
    files = [path for site in _site_packages() for path in site.glob("*.dist-info/METADATA")]
    for path in _sampling_order(files):
        message = email.message_from_string(path.read_text(encoding="utf-8", errors="replace"))
        yield Document(f"web/{path.parent.name}", message.get_payload())


SOURCES: dict[str, Callable[[], Iterator[Document]]] = {
    "code": code_documents,
    "science": science_documents,
    "web": web_documents,
}


def write_source(
    name: str, documents: Iterable[Document], file: Path, max_bytes: int, progress: bool = True
) -> SourceStats:
    """Write ``documents`` as JSON lines until the next one would take ``file`` past ``max_bytes``."""
    largest = max_bytes // MAX_DOCUMENT_SHARE
    count = size = 0
    bar = tqdm(total=max_bytes, unit="B", unit_scale=True, desc=name, disable=not progress)
    with file.open("wb") as out, bar:
        for document in documents:
            if len(document.text.strip()) < MIN_CHARS:
                continue
            record = {"id": document.id, "source": name, "text": document.text}
            # A docstring can spell a lone surrogate ("\udc80"), which UTF-8 cannot hold.
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", errors="replace")
            if len(line) > largest:
                continue
            if size + len(line) > max_bytes:
                break
            out.write(line)
            count, size = count + 1, size + len(line)
            bar.update(len(line))
    return SourceStats(documents=count, bytes=size)


def build_demo_corpus(
    output_dir: str | Path,
    max_bytes_per_source: int = DEFAULT_MAX_BYTES_PER_SOURCE,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Build the corpus into ``output_dir`` atomically; returns the manifest it writes."""
    if max_bytes_per_source <= 0:
        raise DemoCorpusError(f"max bytes per source must be positive, got {max_bytes_per_source}")
    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        sources = {}
        for name, documents in SOURCES.items():
            (staging / name).mkdir()
            stats = write_source(name, documents(), staging / name / PART, max_bytes_per_source, progress)
            if stats.documents == 0:
                raise DemoCorpusError(
                    f"source {name!r} has no documents: nothing installed to draw on, or "
                    f"{max_bytes_per_source} bytes per source leaves no room for one"
                )
            sources[name] = {"path": f"{name}/{PART}", **asdict(stats)}
        manifest = {"max_bytes_per_source": max_bytes_per_source, "sources": sources}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
