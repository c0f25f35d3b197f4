"""No function or method in sputnik/ runs over 80 lines, unless a comment says why: a line containing "long because"
right above the `def` (or its decorators), on the `def` line, or in the first line of its docstring."""

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parent.parent / "sputnik"
MAX_LINES = 80
MARKER = "long because"


def length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from `def` to the last line of the body (decorators not counted)."""
    return node.end_lineno - node.lineno + 1


def explained(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> bool:
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    around = [lines[first - 2] if first >= 2 else "", lines[node.lineno - 1]]
    doc = ast.get_docstring(node, clean=False)
    if doc:
        around.append(doc.strip().splitlines()[0])
    return any(MARKER in line.lower() for line in around)


def long_functions(source: str, name: str) -> list[str]:
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, filename=name)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and length(node) > MAX_LINES:
            if not explained(node, lines):
                found.append(f"{name}:{node.lineno} {node.name}: {length(node)} lines")
    return found


def test_no_function_over_80_lines_without_a_reason():
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py"))
                 for hit in long_functions(path.read_text(), str(path.relative_to(PACKAGE.parent)))]
    assert not offenders, (f"functions over {MAX_LINES} lines (split them, or say why with a '# {MARKER} ...' "
                           "comment above the def):\n" + "\n".join(offenders))


def test_the_check_counts_lines_and_reads_the_reason():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))  # def + 80 lines = 81
    assert long_functions("def f():\n" + body, "m.py") == ["m.py:1 f: 81 lines"]
    assert long_functions("def f():\n" + body[: -len("    x79 = 79\n")], "m.py") == []
    assert long_functions("# long because the table reads best in one place\ndef f():\n" + body, "m.py") == []
    assert long_functions('def f():\n    """Long because: one state machine."""\n' + body, "m.py") == []
    nested = "class A:\n    @property\n    def g(self):\n" + body.replace("    ", "        ")
    assert long_functions(nested, "m.py") == ["m.py:3 g: 81 lines"]
