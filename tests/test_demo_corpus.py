"""The offline demo corpus: three non-empty sources, valid JSON lines, a true manifest, identical rebuilds."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flexbert.core.atomic_output import OutputExistsError
from flexbert.data.demo_corpus import (
    MAX_DOCUMENT_SHARE,
    MIN_CHARS,
    PART,
    SCIENCE_PACKAGES,
    DemoCorpusError,
    build_demo_corpus,
    module_docstrings,
)

REPO = Path(__file__).resolve().parents[1]
CAP = 200_000


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "data_prep/build_demo_corpus.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def file_bytes(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The corpus built with the command line (capped at CAP bytes per source)."""
    out = tmp_path_factory.mktemp("demo") / "corpus"
    result = run_cli(str(out), "--max-bytes-per-source", str(CAP), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("flexbert prepare corpus: code ")
    return out


def read_records(corpus: Path, source: str) -> list[dict]:
    return [json.loads(line) for line in (corpus / source / PART).read_text(encoding="utf-8").splitlines()]


def test_a_rebuild_is_byte_identical(corpus, tmp_path):
    build_demo_corpus(tmp_path / "again", CAP, progress=False)
    assert file_bytes(tmp_path / "again") == file_bytes(corpus)


def test_manifest_counts_what_was_written(corpus):
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["max_bytes_per_source"] == CAP
    assert sorted(manifest["sources"]) == ["code", "science", "web"]
    for source, entry in manifest["sources"].items():
        file = corpus / entry["path"]
        assert file == corpus / source / PART
        assert entry["documents"] == len(file.read_bytes().splitlines()) > 0
        assert entry["bytes"] == file.stat().st_size <= CAP


@pytest.mark.parametrize("source", ["code", "science", "web"])
def test_every_line_is_a_substantial_document_of_its_source(corpus, source):
    records = read_records(corpus, source)
    assert records
    assert all(record["source"] == source and record["id"].startswith(f"{source}/") for record in records)
    assert all(len(record["text"].strip()) >= MIN_CHARS for record in records)
    assert len({record["id"] for record in records}) == len(records)
    lines = (corpus / source / PART).read_bytes().splitlines(keepends=True)
    assert max(map(len, lines)) <= CAP // MAX_DOCUMENT_SHARE


def test_sources_hold_what_they_claim(corpus):
    for record in read_records(corpus, "code"):
        ast.parse(record["text"])  # standard library source is valid Python
    assert {record["id"].split("/")[1] for record in read_records(corpus, "science")} <= set(SCIENCE_PACKAGES)
    assert all(record["id"].endswith(".dist-info") for record in read_records(corpus, "web"))


def test_module_docstrings_keeps_module_class_and_function_docs_in_order():
    source = '''
"""The module."""
def f():
    """Eff."""
class C:
    """See."""
    def m(self):
        """Em."""
    def undocumented(self):
        pass
'''
    assert module_docstrings(source) == "The module.\n\nf\nEff.\n\nC\nSee.\n\nC.m\nEm."


def test_an_existing_output_is_refused_and_kept(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="already exists and is not empty"):
        build_demo_corpus(tmp_path / "out", CAP, progress=False)
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["keep.txt"]
    result = run_cli(str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr == (
        f"flexbert: error: output {tmp_path / 'out'} already exists and is not empty; use --overwrite to replace it\n"
    )


def test_a_cap_too_small_for_any_document_fails_and_writes_nothing(tmp_path):
    with pytest.raises(DemoCorpusError, match="source 'code' has no documents"):
        build_demo_corpus(tmp_path / "out", MIN_CHARS * MAX_DOCUMENT_SHARE, progress=False)
    assert list(tmp_path.iterdir()) == []
