"""Offline English/code text for the benchmarks that train or evaluate language models.

Two sources, both shipped with this machine's Python and deterministic for one Python version:

- :func:`docstring_documents`: whole docstrings of the ``lowbit_accuracy.CORPUS_MODULES`` modules,
  their public members and methods, read by importing them (``train_tiny_gpt.py``'s corpus, ~0.5 MB).
- :func:`stdlib_source_documents`: every docstring (module, class, function) of every ``.py`` file of the
  standard library, read with :mod:`ast` without importing anything (~several MB), with a split
  :func:`split_documents` that holds out whole files, so no held-out text shares a file with training text.

Both are ASCII (other characters dropped) and cleaned with :func:`inspect.cleandoc`.
"""

from __future__ import annotations

import ast
import inspect
import sysconfig
from pathlib import Path

from lowbit_accuracy import CORPUS_MODULES, public_docstrings

MIN_DOC_CHARS = 40


def _clean(doc: str) -> str:
    return inspect.cleandoc(doc).encode("ascii", "ignore").decode()


def docstring_documents() -> list[str]:
    """Whole docstrings (module, public members and methods) of the corpus modules, ASCII, deduplicated."""
    seen: dict[str, None] = {}
    for module_name in CORPUS_MODULES:
        for doc in public_docstrings(module_name, methods=True):
            if doc and len(doc) >= MIN_DOC_CHARS:
                seen.setdefault(_clean(doc), None)
    return list(seen)


def _file_docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    docs = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=False)
        if doc and len(doc) >= MIN_DOC_CHARS:
            docs.append(_clean(doc))
    return docs


def stdlib_source_files() -> list[Path]:
    """The standard library's ``.py`` files in sorted order, without tests, site-packages and idlelib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def stdlib_source_documents() -> list[tuple[str, list[str]]]:
    """(file relative to the stdlib root, its docstrings deduplicated across the corpus) per source file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    out = []
    for path in stdlib_source_files():
        docs = [d for d in _file_docstrings(path) if d not in seen]
        seen.update(docs)
        if docs:
            out.append((str(path.relative_to(root)), docs))
    return out


def split_documents(held_out_every: int = 10) -> tuple[str, str]:
    """(train, held-out) text of :func:`stdlib_source_documents`: every ``held_out_every``-th file is
    held out whole; documents end with a blank line."""
    files = stdlib_source_documents()
    parts: tuple[list[str], list[str]] = ([], [])
    for i, (_, docs) in enumerate(files):
        parts[i % held_out_every == held_out_every - 1].extend(d + "\n\n" for d in docs)
    return "".join(parts[0]), "".join(parts[1])
