"""The embedded default corpus: text that ships with Python itself, so no download is needed.

``pydocs`` is the pydoc help topics (``pydoc_data.topics``, the language reference as plain
text) plus the module, class and function docstrings of the standard library, read with
``ast`` (no module is imported, so nothing runs). About 1 MB; the same bytes for the same
Python version, which the manifest records.
"""
from __future__ import annotations

import ast
import inspect
import os
import sys
import sysconfig
from functools import lru_cache
from typing import Callable, Dict, Iterator, Tuple

# Directories of the standard library that are tests, demos or vendored code.
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3",
              "ensurepip", "turtledemo", "__pycache__", "__phello__", "config-3.11-x86_64-linux-gnu"}
_DOCSTRING_BUDGET = 600_000  # characters of docstrings, on top of the ~465 kB of topics


def _module_docs(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc and len(doc) > 40:
                parts.append(inspect.cleandoc(doc))
    return "\n\n".join(parts)


def pydocs() -> Iterator[Tuple[str, str]]:
    """Yield ``(source_id, text)`` documents in a fixed order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc_data.topics:{name}", topics[name]
    root = sysconfig.get_paths()["stdlib"]
    used = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            path = os.path.join(dirpath, fn)
            text = _module_docs(path)
            if not text:
                continue
            rel = os.path.relpath(path, root)
            yield f"stdlib:{rel}", text
            used += len(text)
            if used >= _DOCSTRING_BUDGET:
                return


EMBEDDED: Dict[str, Callable[[], Iterator[Tuple[str, str]]]] = {"pydocs": pydocs}


@lru_cache(maxsize=2)
def embedded_docs(name: str) -> Tuple[Tuple[str, str], ...]:
    """The documents of an embedded corpus, built once per process (read and hashed)."""
    return tuple(EMBEDDED[name]())


def embedded_version() -> str:
    return f"python-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
