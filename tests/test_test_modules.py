"""The test modules share helpers through tests/helpers.py and
tests/whitening_toy.py only: no test module imports another (which would
run the imported module's set-up and tie the two files together)."""
import ast
import glob
import os.path as osp

from helpers import TESTS


def imported_modules(path: str) -> set:
    """The top-level names of the modules that ``path`` imports."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module \
                and not node.level:
            names.add(node.module.split('.')[0])
    return names


def test_no_test_module_imports_another():
    paths = sorted(glob.glob(osp.join(TESTS, '*.py')))
    test_modules = {osp.basename(p)[:-3] for p in paths
                    if osp.basename(p).startswith('test_')}
    assert 'test_tools' in test_modules  # the glob found the suite
    offenders = {osp.basename(p): sorted(imported_modules(p) & test_modules)
                 for p in paths}
    assert {k: v for k, v in offenders.items() if v} == {}
