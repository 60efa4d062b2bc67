"""The Python scripts that tests run in child processes (module-level string constants, such as
tests/gpu/test_graphs_gpu.py's FAILED_CAPTURE) define or import every name they use. A GPU test's child
script runs only on a GPU, so a name lost in a clean-up (an import removed as unused at module level)
would otherwise first fail in a GPU session's few minutes."""
import ast
import builtins
import symtable
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def child_scripts() -> dict[str, str]:
    """{file:NAME: source} of every module-level NAME = \"\"\"...\"\"\" in the tests that parses as Python with an
    import (a script, not a message or a data literal)."""
    found = {}
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, str) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)):
                continue
            source = node.value.value
            try:
                tree = ast.parse(source)
            except SyntaxError:
                continue
            if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body):
                found[f"{path.relative_to(TESTS)}:{node.targets[0].id}"] = source
    return found


def undefined_names(source: str) -> set[str]:
    """Globals a script reads that it neither assigns, imports nor finds among the builtins."""
    top = symtable.symtable(source, "<child>", "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    defined |= set(dir(builtins))
    read, tables = set(), [top]
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        for symbol in table.get_symbols():
            is_global = table is top or symbol.is_global()
            if is_global and symbol.is_referenced():
                read.add(symbol.get_name())
    return read - defined


def test_the_tests_have_child_scripts_to_check():
    assert {"gpu/test_graphs_gpu.py:FAILED_CAPTURE", "test_kernels.py:FAR_APART_ROWS"} <= set(child_scripts())


@pytest.mark.parametrize("name, source", sorted(child_scripts().items()))
def test_child_scripts_define_every_name_they_use(name, source):
    assert not undefined_names(source), f"{name} uses names it never defines or imports"


def test_an_undefined_name_is_found_in_a_function_too():
    assert undefined_names("import torch\ndef unit():\n    return GraphRunner(torch.device('cuda'))\n") == \
        {"GraphRunner"}
    assert undefined_names("import torch\nx = 1\ndef unit(y):\n    z = y + x\n    return z\n") == set()
