"""Every import line and every dotted ``convdescent.x.y`` name in README.md and docs/*.md works as written, each
in a fresh interpreter (an import that works only after another module was loaded is a failure)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
IMPORT = re.compile(r"^\s*(from\s+convdescent[\w.]*\s+import\s+.+|import\s+convdescent[\w.]*(\s+as\s+\w+)?)\s*$")
INLINE_IMPORT = re.compile(r"`(from\s+convdescent[\w.]*\s+import\s+[^`]+|import\s+convdescent[\w.]*)`")
DOTTED = re.compile(r"`(convdescent(?:\.\w+)+)(?:\(|`)")

# Run in one interpreter that has loaded only the heavy third-party modules; each statement runs in a forked
# child, so each sees convdescent imported for the first time.
CHILD = r"""
import json, os, sys
import numpy, torch  # loaded once; convdescent itself is imported afresh in every child
statements = json.loads(sys.stdin.read())
failures = []
for where, code in statements:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            exec(compile(code, where, "exec"), {})
            msg = b""
        except BaseException as e:
            msg = f"{type(e).__name__}: {e}".encode()
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    msg = os.read(r, 65536).decode()
    os.close(r)
    os.waitpid(pid, 0)
    if msg:
        failures.append(f"{where}: {code.strip()!r} -> {msg}")
print(json.dumps(failures))
"""


def _join_parens(lines: list[str]):
    """Import statements of a code block, a parenthesized one joined onto one line."""
    i = 0
    while i < len(lines):
        line = lines[i]
        if re.match(r"^\s*from\s+convdescent", line) and "(" in line and ")" not in line:
            j = i
            while ")" not in lines[j] and j + 1 < len(lines):
                j += 1
            yield i, " ".join(x.strip() for x in lines[i:j + 1])
            i = j + 1
            continue
        yield i, line
        i += 1


def _dotted_check(name: str) -> str:
    # the longest importable module prefix, then attributes
    return (f"import importlib\nparts = {name.split('.')!r}\nobj = None\n"
            "for k in range(len(parts), 0, -1):\n"
            "    try:\n        obj = importlib.import_module('.'.join(parts[:k]))\n        break\n"
            "    except ModuleNotFoundError:\n        continue\n"
            "for attr in parts[k:]:\n    obj = getattr(obj, attr)\n")


def statements() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        in_python = False
        for i, line in enumerate(lines):
            if line.startswith("```"):
                in_python = line.strip() in ("```python", "```py")
                continue
            where = f"{doc.relative_to(ROOT)}:{i + 1}"
            for m in INLINE_IMPORT.finditer(line):
                found.append((where, m.group(1)))
            for m in DOTTED.finditer(line):
                found.append((where, _dotted_check(m.group(1))))
        block: list[str] = []
        starts = []
        for i, line in enumerate(lines):
            if line.startswith("```"):
                if block:
                    for k, stmt in _join_parens(block):
                        if IMPORT.match(stmt):
                            found.append((f"{doc.relative_to(ROOT)}:{starts[0] + k + 1}",
                                          stmt.split("#")[0].strip()))
                block, starts = [], []
                in_python = line.strip() in ("```python", "```py")
                if in_python:
                    starts = [i + 1]
                continue
            if in_python:
                block.append(line)
    return found


def test_the_docs_have_import_lines_to_check():
    stmts = statements()
    assert len(stmts) >= 10
    assert any("train_from_config" in code for _, code in stmts)


def test_every_documented_import_works_in_a_fresh_interpreter():
    stmts = statements()
    proc = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(stmts), capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)


def test_the_checker_reports_a_name_that_is_not_there():
    bad = [("x.md:1", "from convdescent.train import no_such_name"), ("x.md:2", _dotted_check("convdescent.nope.f"))]
    proc = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(bad), capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(failures) == 2 and "ImportError" in failures[0] and "AttributeError" in failures[1]
