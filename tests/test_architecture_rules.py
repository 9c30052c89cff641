"""The import rules of docs/architecture.md: every module of bpt_mm/ belongs
to one part, and a part imports only the parts the page allows; the
fixtures (bpt_mm.testing) are not imported by the runtime package, nothing
in bpt_mm/ imports tools/ or tests/, and there is no import cycle at module
level."""
import ast
import os
import os.path as osp
import subprocess
import sys
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

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


@pytest.fixture(scope='module')
def modules_loaded():
    """The bpt_mm and matplotlib modules a fresh interpreter holds after
    ``import bpt_mm``, and after ``import bpt_mm.launch`` as well (one
    interpreter for both: starting one costs seconds)."""
    code = ('import sys\n'
            'def loaded():\n'
            '    print(sorted(m for m in sys.modules\n'
            "                 if m.startswith(('bpt_mm', 'matplotlib'))))\n"
            'import bpt_mm\nloaded()\nimport bpt_mm.launch\nloaded()\n')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                         capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 0, out.stderr[-2000:]
    package, with_launch = out.stdout.strip().splitlines()[-2:]
    return ast.literal_eval(package), ast.literal_eval(with_launch)


def test_import_bpt_mm_does_not_load_the_fixtures(modules_loaded):
    _, loaded = modules_loaded
    assert 'bpt_mm.launch' in loaded  # the walk saw the launch import
    assert [m for m in loaded if m.startswith('bpt_mm.testing')] == []


# ---------------------------------------------------------------- the parts
#: Module-name prefix -> part (the longest prefix wins; ``bpt_mm`` itself is
#: the package root). ``bpt_mm.whitening`` is the whitening wing, a
#: subpackage like ``bpt_mm.models``.
PART_OF_PREFIX = {
    'bpt_mm.choices': 'base',
    'bpt_mm.compat': 'base',
    'bpt_mm.data_check': 'base',
    'bpt_mm.finite': 'base',
    'bpt_mm.package_files': 'base',
    'bpt_mm.registry': 'base',
    'bpt_mm.safe_load': 'base',
    'bpt_mm.test_options': 'base',
    'bpt_mm.utils': 'base',
    'bpt_mm.version': 'base',
    'bpt_mm.models': 'models',
    'bpt_mm.whitening': 'whitening',
    'bpt_mm.analysis': 'analysis',
    'bpt_mm.engine': 'engine',
    'bpt_mm.mmengine_patches': 'runtime adaptations',
    'bpt_mm.launch': 'launch',
    'bpt_mm.testing': 'fixtures',
}
ROOT_PACKAGE = 'bpt_mm'

#: Part -> the other parts it may import (docs/architecture.md, "What may
#: import what"), at module level and inside functions alike.
MAY_IMPORT: Dict[str, Set[str]] = {
    'base': set(),
    'models': {'base'},
    'whitening': {'models', 'base'},
    'analysis': {'whitening', 'models', 'base'},
    'engine': {'analysis', 'whitening', 'models', 'base'},
    'runtime adaptations': {'engine', 'models', 'base'},
    'package': {'runtime adaptations', 'engine', 'models', 'base'},
    'launch': {'package', 'runtime adaptations', 'engine', 'analysis',
               'whitening', 'models', 'base'},
    'fixtures': {'models', 'base'},
}

def part_of(module: str) -> Optional[str]:
    """The part of a ``bpt_mm`` module name, or None if the table lacks it.
    """
    if module == ROOT_PACKAGE:
        return 'package'
    matches = [p for p in PART_OF_PREFIX
               if module == p or module.startswith(p + '.')]
    return PART_OF_PREFIX[max(matches, key=len)] if matches else None


def module_name(path: str) -> str:
    """``bpt_mm/models/vit.py`` -> ``bpt_mm.models.vit``; a package's
    ``__init__.py`` -> the package."""
    rel = osp.relpath(path, ROOT)[:-3].replace(os.sep, '.')
    return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def package_modules() -> Dict[str, str]:
    """Every module of bpt_mm/ (fixtures included): name -> path."""
    found = {}
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != '__pycache__']
        for name in files:
            if name.endswith('.py'):
                path = osp.join(folder, name)
                found[module_name(path)] = path
    return found


#: When an import runs: as the module is imported, when a function runs,
#: or never (under ``if TYPE_CHECKING:``, for type checkers only).
AT_IMPORT = 'at module level'
IN_FUNCTION = 'inside a function'
TYPE_CHECKING_ONLY = 'for type checking only'


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING') or \
        (isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING')


class _ImportVisitor(ast.NodeVisitor):
    """Collects ``(names, source, when)`` of every import statement."""

    def __init__(self):
        self.when = AT_IMPORT
        self.found: List[Tuple[List[str], Optional[Tuple[int, str]],
                               str]] = []

    def _nested(self, nodes, when):
        outer, self.when = self.when, when
        for node in nodes:
            self.visit(node)
        self.when = outer

    def _function(self, node):
        # a function inside `if TYPE_CHECKING:` still never runs
        self._nested(ast.iter_child_nodes(node),
                     TYPE_CHECKING_ONLY if self.when == TYPE_CHECKING_ONLY
                     else IN_FUNCTION)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node):
        if _is_type_checking(node.test):
            self.visit(node.test)
            self._nested(node.body, TYPE_CHECKING_ONLY)
            self._nested(node.orelse, self.when)
        else:
            self.generic_visit(node)

    def visit_Import(self, node):
        for alias in node.names:
            self.found.append(([alias.name], None, self.when))

    def visit_ImportFrom(self, node):
        self.found.append(([a.name for a in node.names],
                           (node.level, node.module or ''), self.when))


def import_edges(path: str, modules: Set[str]
                 ) -> Iterator[Tuple[str, str]]:
    """``(imported bpt_mm module, when)`` for every import of ``path`` that
    reaches a module of bpt_mm/.

    ``from X import y`` reaches ``X.y`` when that is a module (``from .
    import engine``), else ``X``; ``import X.Y`` reaches the longest
    module prefix of ``X.Y``. ``when`` is :data:`IN_FUNCTION` inside a
    function, :data:`TYPE_CHECKING_ONLY` under ``if TYPE_CHECKING:``, else
    :data:`AT_IMPORT` (class bodies included).
    """
    name = module_name(path)
    package = name if path.endswith('__init__.py') else \
        name.rsplit('.', 1)[0]
    visitor = _ImportVisitor()
    visitor.visit(ast.parse(open(path).read()))
    for names, source, when in visitor.found:
        if source is None:
            targets = []
            for full in names:
                parts = full.split('.')
                prefixes = ['.'.join(parts[:i])
                            for i in range(len(parts), 0, -1)]
                targets += [p for p in prefixes if p in modules][:1]
        else:
            level, base = source
            if level:
                parts = package.split('.')
                parts = parts[:len(parts) - level + 1]
                base = '.'.join(parts + ([base] if base else []))
            targets = [f'{base}.{n}' if f'{base}.{n}' in modules else base
                       for n in names]
        for target in dict.fromkeys(targets):
            if target in modules:
                yield target, when


def all_edges() -> List[Tuple[str, str, str]]:
    """``(importer, imported, when)`` over bpt_mm/."""
    modules = package_modules()
    return [(importer, imported, when)
            for importer, path in sorted(modules.items())
            for imported, when in import_edges(path, set(modules))]


def rule_breaks(edges) -> List[str]:
    """The edges of ``edges`` that :data:`MAY_IMPORT` does not allow, as
    readable lines."""
    breaks = []
    for importer, imported, when in edges:
        source, target = part_of(importer), part_of(imported)
        if source is None or target is None:
            unknown = importer if source is None else imported
            breaks.append(f'{unknown}: not in PART_OF_PREFIX (give the '
                          f'module a part here and in '
                          f'docs/architecture.md)')
        elif source != target and target not in MAY_IMPORT[source]:
            breaks.append(f'{importer} ({source}) imports {imported} '
                          f'({target}) {when}')
    return breaks


def test_every_module_has_a_part_and_imports_only_allowed_parts():
    edges = all_edges()
    assert rule_breaks(edges) == []
    # The walk sees the edges the page names, at the right level: a check
    # that sees nothing could not fail.
    seen = set(edges)
    assert ('bpt_mm.engine.prompt_stats_hook', 'bpt_mm.analysis.burstiness',
            AT_IMPORT) in seen
    assert ('bpt_mm.analysis.param_budget', 'bpt_mm.models',
            IN_FUNCTION) in seen
    assert ('bpt_mm.launch.preflight', 'bpt_mm.models.prompts',
            TYPE_CHECKING_ONLY) in seen
    assert ('bpt_mm', 'bpt_mm.mmengine_patches', AT_IMPORT) in seen
    assert ('bpt_mm', 'bpt_mm.engine', AT_IMPORT) in seen
    assert all(part_of(m) is not None for m in package_modules())


def test_the_rules_refuse_an_upward_import():
    # The same checker on made-up edges: what the page forbids is caught.
    assert rule_breaks([('bpt_mm.models.vit', 'bpt_mm.engine.hooks',
                         IN_FUNCTION)]) == [
        'bpt_mm.models.vit (models) imports bpt_mm.engine.hooks (engine) '
        'inside a function']
    assert len(rule_breaks([
        ('bpt_mm.engine.hooks', 'bpt_mm.mmengine_patches', AT_IMPORT),
        ('bpt_mm.engine.hooks', 'bpt_mm', AT_IMPORT),
        ('bpt_mm.compat', 'bpt_mm.models.vit', TYPE_CHECKING_ONLY),
        ('bpt_mm.whitening.linalg', 'bpt_mm.analysis', AT_IMPORT),
        ('bpt_mm.engine.optim', 'bpt_mm.launch.config', IN_FUNCTION),
        ('bpt_mm.analysis.report', 'bpt_mm.testing.tiny_data', IN_FUNCTION),
        ('bpt_mm.newpart', 'bpt_mm.base', AT_IMPORT)])) == 7
    assert part_of('bpt_mm.whitening.collect') == 'whitening'
    assert part_of('bpt_mm.analysis') == 'analysis'
    assert part_of('bpt_mm.models.vit') == 'models'
    assert part_of('bpt_mm.engine.trainable_state') == 'engine'


def module_level_cycles(edges) -> List[List[str]]:
    """Cycles among modules through the imports of ``edges`` (``importer,
    imported, when``) that run as a module is imported, each as a path
    back to its start."""
    graph: Dict[str, Set[str]] = {}
    for importer, imported, when in edges:
        if when == AT_IMPORT and importer != imported:
            graph.setdefault(importer, set()).add(imported)
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycle_at_module_level():
    assert module_level_cycles(all_edges()) == []
    # the finder finds one, and none through an import that does not run
    # at import time
    assert module_level_cycles([('a', 'b', AT_IMPORT), ('b', 'c', AT_IMPORT),
                                ('c', 'a', AT_IMPORT)]) == [['a', 'b', 'c',
                                                             'a']]
    for when in (IN_FUNCTION, TYPE_CHECKING_ONLY):
        assert module_level_cycles([('a', 'b', AT_IMPORT),
                                    ('b', 'a', when)]) == []


def test_import_bpt_mm_loads_neither_launch_nor_the_report(
        modules_loaded):
    loaded, _ = modules_loaded
    # what the package root and its parts import ...
    for name in ('bpt_mm.models.vit', 'bpt_mm.engine.whitening_hook',
                 'bpt_mm.analysis.burstiness', 'bpt_mm.mmengine_patches'):
        assert name in loaded, name
    # ... and nothing else
    assert [m for m in loaded if m.startswith(
        ('bpt_mm.launch', 'bpt_mm.testing', 'bpt_mm.analysis.report',
         'matplotlib'))] == []
