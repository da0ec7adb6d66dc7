"""The design notes are inside the repository: no citation leaves it, and every docs/<file>.md §n that code,
tests, examples or docs cite names a numbered section that exists."""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", "build", "dist", "__pycache__", "runs", "bench_results", ".pytest_cache", ".hypothesis"}
SUFFIXES = {".py", ".md", ".h", ".cpp", ".cu", ".cuh", ".txt", ".toml", ".json", ".yaml", ".yml", ".sh", ".cfg"}
NUM = r"\d+(?:\.\d+)*"
SEC = rf"§\s?({NUM})(?:[a-z](?:,[a-z])*|\([a-z]\))?(?:\s?[-–]\s?§?({NUM}))?"
CITE = re.compile(rf"(docs/[\w./-]+\.md)((?:(?:,\s?|\s)§\s?{NUM}[^\s,;)]*)+)")


def source_files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP and not d.startswith(".venv")
                       and not d.endswith(".egg-info")]
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix in SUFFIXES and not path.is_symlink():
                yield path.relative_to(ROOT), path.read_text(encoding="utf-8", errors="replace")


def sections(doc: Path):
    return {m.group(1) for m in re.finditer(rf"^#{{1,6}}\s+({NUM})\.?(?:\s|$)", doc.read_text(), re.M)}


def test_no_reference_to_out_of_tree_specs():
    outside = "specs" + "/"  # built from parts so that a grep of the tree does not find this file
    hits = [f"{rel}:{i}" for rel, text in source_files()
            for i, line in enumerate(text.splitlines(), 1) if outside in line]
    assert not hits, f"citations of notes outside the repository: {hits}"


def test_no_work_tracking_comments():
    tracking = re.compile(r"\(" + "issue" + r" \d+\)")  # built from parts so this file does not match itself
    hits = [f"{rel}:{i}" for rel, text in source_files()
            for i, line in enumerate(text.splitlines(), 1) if tracking.search(line)]
    assert not hits, f"work-tracking comments: {hits}"


def test_cited_doc_sections_exist():
    missing, cache = [], {}
    for rel, text in source_files():
        for m in CITE.finditer(text):
            doc = ROOT / m.group(1)
            if not doc.is_file():
                missing.append(f"{rel}: {m.group(1)} does not exist")
                continue
            have = cache.setdefault(doc, sections(doc))
            for s in re.finditer(SEC, m.group(2)):
                for num in filter(None, s.groups()):
                    if num not in have:
                        missing.append(f"{rel}: {m.group(1)} has no §{num}")
    assert not missing, missing


@pytest.mark.parametrize("method", ["ddg", "ddis", "dpdmd", "gendd"])
def test_method_notes_exist(method):
    assert sections(ROOT / "docs" / "methods" / f"{method}.md") >= {"1", "2"}
