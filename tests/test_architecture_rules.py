"""Import rules of docs/architecture.md that a test can hold: the fixtures
(bpt_mm.testing) are not imported by the runtime package, and nothing in
bpt_mm/ imports tools/ or tests/."""
import ast
import os
import os.path as osp
import subprocess
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
PACKAGE = osp.join(ROOT, 'bpt_mm')


def imported_modules(path):
    """Absolute names of every module ``path`` imports (at any depth)."""
    rel = osp.relpath(path, ROOT)[:-3].replace(os.sep, '.')
    package = rel.rsplit('.', 1)[0] if not rel.endswith('__init__') \
        else rel.rsplit('.', 1)[0]
    names = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = package.split('.')
                parts = parts[:len(parts) - node.level + 1]
                base = '.'.join(parts + ([base] if base else []))
            names += [base] + [f'{base}.{a.name}' for a in node.names]
    return names


def runtime_files():
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d not in ('testing', '__pycache__')]
        for name in files:
            if name.endswith('.py'):
                yield osp.join(folder, name)


def test_no_runtime_module_imports_the_fixtures_or_tools_or_tests():
    offenders = []
    for path in runtime_files():
        for name in imported_modules(path):
            if name.startswith(('bpt_mm.testing', 'tools', 'tests',
                                'test_', 'helpers', 'whitening_toy')):
                offenders.append((osp.relpath(path, ROOT), name))
    assert offenders == []
    # the walk sees real imports (a check that could not fail is no check)
    assert 'bpt_mm.models.vit.PromptedViT' in imported_modules(
        osp.join(PACKAGE, 'models', '__init__.py'))


def test_import_bpt_mm_does_not_load_the_fixtures():
    code = ('import sys, bpt_mm, bpt_mm.launch; '
            'print(sorted(m for m in sys.modules '
            "if m.startswith('bpt_mm.testing')))")
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                         capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == '[]'


def test_models_do_not_import_the_whitening_wing():
    # The wing may import models (the token tap, the SPT option values);
    # models never import the wing, at module level or inside a function.
    offenders = []
    for folder, _, files in os.walk(osp.join(PACKAGE, 'models')):
        for name in files:
            if name.endswith('.py'):
                path = osp.join(folder, name)
                offenders += [(osp.relpath(path, ROOT), module)
                              for module in imported_modules(path)
                              if module.startswith('bpt_mm.whitening')]
    assert offenders == []
    # the walk resolves the wing's relative imports and sees its edge down
    wing = imported_modules(osp.join(PACKAGE, 'whitening', 'prototypes.py'))
    assert 'bpt_mm.models.prompts' in wing
    assert 'bpt_mm.whitening.options' in wing
