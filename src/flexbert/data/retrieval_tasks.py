"""Retrieval benchmarks built offline, written in BEIR's layout, and read back for evaluation.

Two tasks, each with a ``train`` and an ``eval`` split:

- ``code-search``, built as CodeSearchNet was (Husain et al., 2019): every function and method with
  a docstring in a fixed set of Python packages that flexbert always installs becomes a pair whose
  query is the docstring's first paragraph and whose document is the function's source without its
  docstring. Whole packages are held out for ``eval``, so no evaluated function's module was seen in
  training. The pairs depend on the installed versions, which the manifest records.
- ``stsb``: GLUE STS-B's sentence pairs scored at least 4 of 5 are paraphrases; the first sentence
  is a query, the second its one relevant document, and every second sentence of the split is in the
  corpus (train.tsv for ``train``, dev.tsv for ``eval``).

A task folder holds ``manifest.json`` and, per split, ``SPLIT/queries.jsonl`` and
``SPLIT/corpus.jsonl`` (records ``{"_id", "text"}``; a corpus record may add a ``title``) and
``SPLIT/qrels.tsv`` (``query-id corpus-id score`` under a header line, score > 0 meaning relevant),
as a BEIR dataset holds them, plus ``SPLIT/pairs.jsonl``: one ``{"query", "document"}`` record per
relevant (query, document) pair, the texts themselves, which a contrastive fine-tune reads as its
split (``text_columns: [query, document]``; ``yamls/finetune/embeddings-code-search.yaml``).
"""

from __future__ import annotations

import ast
import csv
import json
import os
import platform
import random
import re
import sysconfig
import tokenize
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

from flexbert.core.atomic_output import atomic_output_dir
from flexbert.core.beir import MANIFEST, RetrievalSplit, RetrievalTaskError, write_split
from flexbert.errors import MissingFileError

TASKS = ("code-search", "stsb")


def _write_task(output: str | os.PathLike, splits: dict[str, RetrievalSplit], manifest: dict, overwrite: bool) -> dict:
    """Write the splits and the manifest (which gains each split's counts) whole or not at all."""
    manifest = {**manifest, "splits": {name: split.counts() for name, split in splits.items()}}
    with atomic_output_dir(output, overwrite=overwrite) as staging:
        for name, split in splits.items():
            write_split(staging / name, split)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# --- code search ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Package:
    module: str  # the import name: its folder in site-packages
    distribution: str  # the name pip installs it by, whose version the manifest records


# flexbert's direct dependencies that ship Python source, split by package: the large training
# libraries for train, the data-handling ones held out for eval.
TRAIN_PACKAGES = (
    Package("torch", "torch"),
    Package("transformers", "transformers"),
    Package("composer", "mosaicml"),
    Package("wandb", "wandb"),
    Package("numpy", "numpy"),
    Package("matplotlib", "matplotlib"),
)
EVAL_PACKAGES = (
    Package("datasets", "datasets"),
    Package("streaming", "mosaicml-streaming"),
    Package("tqdm", "tqdm"),
    Package("omegaconf", "omegaconf"),
    Package("pyarrow", "pyarrow"),
    Package("tokenizers", "tokenizers"),
    Package("safetensors", "safetensors"),
    Package("zstandard", "zstandard"),
)
DEFAULT_PACKAGES = {"train": TRAIN_PACKAGES, "eval": EVAL_PACKAGES}

# CodeSearchNet's filters: no tests, constructors or extension methods (dunders); a query of at
# least 3 words; a function of at least 3 lines. The upper bounds keep a pair within an encoder's
# usual 512 tokens (about 4 characters a token) and a query to a summary, not a manual page.
MIN_QUERY_WORDS, MAX_QUERY_CHARS = 3, 512
MIN_DOCUMENT_LINES, MAX_DOCUMENT_CHARS = 3, 2048
MAX_PAIRS = {"train": 20_000, "eval": 2_000}
TEST_DIRS = frozenset({"test", "tests", "testing", "__pycache__"})
FIELD_LINE = re.compile(r":\w|>>>|\.\. |(Args|Arguments|Parameters|Returns|Raises|Examples?|Notes?):?$")


@dataclass(frozen=True)
class Pair:
    id: str  # package path and qualified name: "tqdm/std.py:tqdm.update"
    query: str
    document: str
    body_key: str  # the function without docstring, comments or formatting, to find copies


def is_test_file(name: str) -> bool:
    return name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py"


def package_files(root: Path) -> list[Path]:
    """A package's Python files in sorted order, tests left out."""
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if name not in TEST_DIRS]
        files += [Path(directory, name) for name in names if name.endswith(".py") and not is_test_file(name)]
    return sorted(files)


def documented_functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of each module-level function and method with a docstring. Functions
    nested in functions are left inside their parent's document, as CodeSearchNet left them."""

    def visit(scope: ast.Module | ast.ClassDef, prefix: str) -> Iterator:
        for node in scope.body:
            if isinstance(node, ast.ClassDef):
                yield from visit(node, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node):
                yield f"{prefix}{node.name}", node

    yield from visit(tree, "")


def summary(docstring: str) -> str:
    """The docstring's first paragraph on one line: up to a blank line or a field list (``:param``,
    ``Args:``, a doctest), whichever comes first."""
    lines = []
    for line in docstring.strip().split("\n"):
        if not line.strip() or (lines and FIELD_LINE.match(line.strip())):
            break
        lines.append(line.strip())
    return " ".join(lines)


def without_docstring(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The function's source (from ``def``, decorators left out) with the lines of its docstring cut
    out, dedented; None when the docstring shares a line with other code."""
    docstring = node.body[0]
    first, last = lines[docstring.lineno - 1], lines[docstring.end_lineno - 1]
    if first[: docstring.col_offset].strip() or last[docstring.end_col_offset :].strip():
        return None
    kept = lines[node.lineno - 1 : docstring.lineno - 1] + lines[docstring.end_lineno : node.end_lineno]
    # Shifted left by the def's indentation (not textwrap.dedent: a multi-line string in the body may
    # reach column 0); a line indented less than that is inside such a string, and stays as it is.
    indent = node.col_offset
    return "\n".join(line[indent:] if not line[:indent].strip() else line for line in kept)


def is_trivial(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A body that does nothing but pass, ``...`` or raise: an abstract method or a stub."""
    return all(
        isinstance(statement, (ast.Pass, ast.Raise))
        or (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant))
        for statement in node.body[1:]
    )


def code_search_pair(pair_id: str, lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> Pair | str:
    """The function's pair, or the reason (a short phrase) it is left out."""
    name = node.name
    if any(word.startswith("test") for word in name.lower().split("_")):
        return "test"
    if name.startswith("__") and name.endswith("__"):
        return "dunder method"
    query = summary(ast.get_docstring(node, clean=True))
    if len(query.split()) < MIN_QUERY_WORDS:
        return "short query"
    if len(query) > MAX_QUERY_CHARS:
        return "long query"
    if is_trivial(node):
        return "trivial body"
    document = without_docstring(lines, node)
    if document is None:
        return "docstring shares a line"
    if len(document.split("\n")) < MIN_DOCUMENT_LINES:
        return "short function"
    if len(document) > MAX_DOCUMENT_CHARS:
        return "long function"
    try:
        stripped = ast.parse(document).body[0]  # comments and formatting fall away; the docstring is gone
    except SyntaxError:  # a tab-indented file, say, whose indentation cannot be shifted by columns
        return "unparsable function"
    if ast.get_docstring(stripped) is not None:  # a string statement after the docstring would read as one
        return "second docstring"
    return Pair(pair_id, query, document, ast.unparse(stripped))


def package_pairs(site: Path, package: Package, dropped: Counter, progress: bool) -> Iterator[Pair]:
    """Every pair of one installed package, in file and source order; ``dropped`` counts the rest."""
    for path in tqdm(package_files(site / package.module), desc=package.module, unit="file", disable=not progress):
        try:
            with tokenize.open(path) as file:  # honours a file's coding declaration
                text = file.read()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # old docstrings' invalid escape sequences warn, harmlessly
                tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            dropped["unparsable file"] += 1
            continue
        lines = text.split("\n")  # tokenize.open translates newlines, so lines match the tree's numbering
        prefix = path.relative_to(site).as_posix()
        for qualified_name, node in documented_functions(tree):
            pair = code_search_pair(f"{prefix}:{qualified_name}", lines, node)
            if isinstance(pair, str):
                dropped[pair] += 1
            else:
                yield pair


def site_packages_holding(package: Package) -> Path:
    """The interpreter's own site-packages folder that holds ``package`` (not sys.path: the working
    directory must not change the benchmark)."""
    paths = sysconfig.get_paths()
    for site in sorted({Path(paths["purelib"]), Path(paths["platlib"])}):
        if (site / package.module / "__init__.py").is_file():
            return site
    raise RetrievalTaskError(f"package {package.module} ({package.distribution}) is not in {paths['purelib']}")


def deduplicated(tagged: Iterator[tuple[str, Pair]], dropped: Counter) -> Iterator[tuple[str, Pair]]:
    """The first (split, pair) of each function name, body and query (compared without case or
    spacing), so that no document and no query appears twice, and none reaches both splits."""
    seen: set[tuple[str, str]] = set()
    for split, pair in tagged:
        keys = [("name", pair.id), ("body", pair.body_key), ("query", " ".join(pair.query.lower().split()))]
        repeated = next((key for key in keys if key in seen), None)
        if repeated is not None:
            dropped[f"duplicate {repeated[0]}"] += 1
            continue
        seen.update(keys)
        yield split, pair


def capped(pairs: list[Pair], cap: int, seed: int, split: str, dropped: Counter) -> list[Pair]:
    """At most ``cap`` pairs, drawn with the seed, kept in id order."""
    if len(pairs) <= cap:
        return pairs
    dropped["over the cap"] += len(pairs) - cap
    chosen = random.Random(f"{seed}/{split}").sample(range(len(pairs)), cap)
    return [pairs[index] for index in sorted(chosen)]


def code_search_split(pairs: list[Pair]) -> RetrievalSplit:
    """Each pair's query and document under ids of their own kind (``q:``, ``d:``): evaluators such as
    BEIR's drop every query-document pair with equal ids, so a shared id would score nothing there."""
    split = RetrievalSplit()
    for pair in pairs:
        query_id, document_id = f"q:{pair.id}", f"d:{pair.id}"
        split.queries[query_id] = pair.query
        split.corpus[document_id] = pair.document
        split.qrels[query_id] = {document_id: 1}
    return split


def build_code_search(
    output: str | os.PathLike,
    seed: int = 0,
    packages: dict[str, tuple[Package, ...]] = DEFAULT_PACKAGES,
    max_pairs: dict[str, int] = MAX_PAIRS,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Build the code-search task into ``output`` atomically; returns the manifest it writes."""
    dropped: Counter = Counter()
    sources = [(name, package, site_packages_holding(package)) for name, group in packages.items() for package in group]
    tagged = (
        (name, pair) for name, package, site in sources for pair in package_pairs(site, package, dropped, progress)
    )
    # One pass over both splits, so that a function copied into an eval package is not evaluated.
    by_split: dict[str, list[Pair]] = {name: [] for name in packages}
    for name, pair in deduplicated(tagged, dropped):
        by_split[name].append(pair)
    splits = {}
    for name, pairs in by_split.items():
        if not pairs:
            raise RetrievalTaskError(f"code search: the {name} packages yield no pairs")
        ordered = sorted(pairs, key=lambda pair: pair.id)
        splits[name] = code_search_split(capped(ordered, max_pairs[name], seed, name, dropped))
    manifest = {
        "task": "code-search",
        "seed": seed,
        "python": platform.python_version(),
        "packages": {
            name: {package.distribution: metadata.version(package.distribution) for package in group}
            for name, group in packages.items()
        },
        "filters": {
            "min_query_words": MIN_QUERY_WORDS,
            "max_query_chars": MAX_QUERY_CHARS,
            "min_document_lines": MIN_DOCUMENT_LINES,
            "max_document_chars": MAX_DOCUMENT_CHARS,
            "max_pairs": max_pairs,
        },
        "dropped": dict(sorted(dropped.items())),
    }
    return _write_task(output, splits, manifest, overwrite)


# --- STS-B paraphrase retrieval ---------------------------------------------------------------------

STSB_FILES = {"train": "STS-B/train.tsv", "eval": "STS-B/dev.tsv"}
STSB_COLUMNS = ("sentence1", "sentence2", "score")
MIN_PARAPHRASE_SCORE = 4.0  # of 5, as the embedding fine-tune (yamls/finetune/embeddings-stsb.yaml) draws its pairs


def stsb_rows(path: Path) -> Iterator[tuple[str, str, float]]:
    """(sentence1, sentence2, score) of each row of a GLUE STS-B TSV."""
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist (pass the GLUE folder holding STS-B/ with --glue)")
    with path.open(encoding="utf-8", newline="") as file:
        # GLUE's TSVs quote nothing; a quote character inside a sentence is just a character.
        rows = csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [column for column in STSB_COLUMNS if column not in (rows.fieldnames or [])]
        if missing:
            raise RetrievalTaskError(f"{path} has no column {missing[0]!r}; is it GLUE's STS-B?")
        for row in rows:
            try:
                score = float(row["score"])
            except (TypeError, ValueError):
                raise RetrievalTaskError(f"{path}:{rows.line_num}: score {row['score']!r} is not a number") from None
            yield row["sentence1"], row["sentence2"], score


def stsb_split(path: Path) -> RetrievalSplit:
    """Every second sentence is a document; a first sentence scored a paraphrase of its second is a
    query. Identical sentences share one id, so a query repeated with several paraphrases has them all."""
    split = RetrievalSplit()
    document_ids: dict[str, str] = {}
    query_ids: dict[str, str] = {}
    for sentence1, sentence2, score in stsb_rows(path):
        document_id = document_ids.setdefault(sentence2, f"d{len(document_ids):05d}")
        split.corpus[document_id] = sentence2
        if score >= MIN_PARAPHRASE_SCORE:
            query_id = query_ids.setdefault(sentence1, f"q{len(query_ids):05d}")
            split.queries[query_id] = sentence1
            split.qrels.setdefault(query_id, {})[document_id] = 1
    if not split.queries:
        raise RetrievalTaskError(f"{path} has no pair scored {MIN_PARAPHRASE_SCORE} or more")
    return split


def build_stsb(output: str | os.PathLike, glue_dir: str | os.PathLike, overwrite: bool = False) -> dict:
    """Build the STS-B task from ``glue_dir`` (holding STS-B/) into ``output`` atomically; returns its manifest."""
    splits = {name: stsb_split(Path(glue_dir) / file) for name, file in STSB_FILES.items()}
    manifest = {"task": "stsb", "source": STSB_FILES, "min_score": MIN_PARAPHRASE_SCORE}
    return _write_task(output, splits, manifest, overwrite)
