"""A text every machine has: English prose from the docstrings of the Python standard library.

``--text python-docs`` (tools/calibrate.py, tools/evaluate.py, tools/sensitivity.py) needs
no download and no file of one's own, and nobody here wrote it. It is assembled from the
standard library's sources, which are parsed with :mod:`ast` and never imported (nothing
runs), in a fixed order:

1. the public top-level modules of ``sys.stdlib_module_names``, sorted by name, without
   the test suites and the few modules that are not library code (``SKIP``); a package
   contributes its ``.py`` files in sorted path order, test folders left out;
2. within a file, the docstrings of the module, its classes and functions, in source order;
3. each docstring is cut into paragraphs at blank lines, and a paragraph is kept when it
   reads as prose: no indented line (code, argument lists), no line that starts like a
   doctest, list item or table, at least 12 words, starting with a capital letter and
   ending with a period, and at least 90% letters, spaces and ``,.;'-``;
4. the lines of a paragraph are joined with single spaces; a paragraph seen before is
   dropped; paragraphs are separated by a blank line.

The text depends only on the Python version (its standard library sources): the files
that use it record that version (``describe``). CPython 3.11 gives about 670 kB in 3,800
paragraphs, ~150k tokens for a 32k-256k vocabulary. A caller that needs less asks for a
prefix (``python_docs(min_chars)``), which stops reading sources early; a prefix is always
a prefix of the whole text.
"""
from __future__ import annotations

import ast
import os
import platform
import re
import sys
import sysconfig
import tokenize
from typing import Iterator, List, Optional

NAME = "python-docs"
# Not library prose: test suites, demos, jokes, and vendored or data-only packages.
SKIP = frozenset({"test", "idlelib", "turtledemo", "antigravity", "this", "lib2to3",
                  "pydoc_data", "ensurepip"})
_TEST_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__"})
_NOT_PROSE_START = (">>>", "...", "-", "*", "+", "|", "=", ":", "#", "$", "%")
_MIN_WORDS = 12
_PROSE_CHARS = frozenset(" ,.;'-")


def source_files() -> List[str]:
    """The standard library's ``.py`` files in reading order (module docstring, item 1)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for name in sorted(n for n in sys.stdlib_module_names
                       if not n.startswith("_") and n not in SKIP):
        module, package = os.path.join(root, name + ".py"), os.path.join(root, name)
        if os.path.isfile(module):
            files.append(module)
        elif os.path.isfile(os.path.join(package, "__init__.py")):
            for here, dirs, names in os.walk(package):
                dirs[:] = sorted(d for d in dirs if d not in _TEST_DIRS)
                files += [os.path.join(here, f) for f in sorted(names) if f.endswith(".py")]
    return files


def _docstrings(node) -> Iterator[str]:
    doc = ast.get_docstring(node, clean=True)
    if doc:
        yield doc
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _docstrings(child)


def prose_paragraphs(doc: str) -> Iterator[str]:
    """The paragraphs of one docstring that read as prose (module docstring, item 3)."""
    for para in re.split(r"\n\s*\n", doc):
        lines = [ln for ln in para.split("\n") if ln.strip()]
        if not lines or any(ln != ln.lstrip() for ln in lines):
            continue
        if any(ln.startswith(_NOT_PROSE_START) for ln in lines):
            continue
        text = " ".join(" ".join(ln.split()) for ln in lines)
        if len(text.split()) < _MIN_WORDS or not text[0].isupper() or not text.endswith("."):
            continue
        if sum(c.isalpha() or c in _PROSE_CHARS for c in text) < 0.9 * len(text):
            continue
        yield text


def _paragraphs() -> Iterator[str]:
    seen = set()
    for path in source_files():
        try:
            with tokenize.open(path) as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue   # a file this interpreter cannot read or parse contributes nothing
        for doc in _docstrings(tree):
            for para in prose_paragraphs(doc):
                if para not in seen:
                    seen.add(para)
                    yield para


_CACHE: List[str] = []        # paragraphs read so far, in order
_STATE = {"iter": None, "chars": 0, "done": False}


def python_docs(min_chars: Optional[int] = None) -> str:
    """The text (module docstring); with ``min_chars``, a prefix of it of whole paragraphs
    and at least ``min_chars`` characters (all of it if it is shorter)."""
    if _STATE["iter"] is None:
        _STATE["iter"] = _paragraphs()
    while not _STATE["done"] and (min_chars is None or _STATE["chars"] < min_chars):
        para = next(_STATE["iter"], None)
        if para is None:
            _STATE["done"] = True
            break
        _STATE["chars"] += len(para) + (2 if _CACHE else 0)
        _CACHE.append(para)
    if min_chars is None:
        return "\n\n".join(_CACHE)
    out, size = [], 0
    for para in _CACHE:
        if size >= min_chars:
            break
        size += len(para) + (2 if out else 0)
        out.append(para)
    return "\n\n".join(out)


def describe() -> dict:
    """What a result file records about the text: its name and where it came from."""
    return {"text": NAME, "text_python": platform.python_version(),
            "text_python_implementation": platform.python_implementation()}
