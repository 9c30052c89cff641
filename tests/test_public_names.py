"""``__all__`` of the modules that declare one: every name listed exists,
and every name that code outside a wing imports from it is listed."""
import ast
import glob
import importlib
import os.path as osp
import pkgutil

import pytest

import bpt_mm
from helpers import ROOT

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(bpt_mm.__path__, 'bpt_mm.'))
#: The wings whose modules declare ``__all__`` (nothing is re-exported by
#: their ``__init__``, so each module's list is its public face).
WINGS = ('bpt_mm.whitening', 'bpt_mm.analysis')


@pytest.mark.parametrize('name', MODULES)
def test_every_listed_name_exists(name):
    module = importlib.import_module(name)
    missing = [item for item in getattr(module, '__all__', ())
               if not hasattr(module, item)]
    assert not missing, f'{name}.__all__ lists absent names {missing}'


def _imports_into_wings():
    """(importing file, wing module, name) for each ``from bpt_mm.<wing>.X
    import name`` in bpt_mm/ and tools/ outside that wing."""
    files = (glob.glob(osp.join(ROOT, 'bpt_mm', '**', '*.py'), recursive=True)
             + glob.glob(osp.join(ROOT, 'tools', '*.py')))
    for path in files:
        rel = osp.relpath(path, ROOT)
        with open(path) as f:
            tree = ast.parse(f.read(), rel)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            for wing in WINGS:
                if node.module.startswith(wing + '.') and not rel.startswith(
                        wing.replace('.', '/') + '/'):
                    for alias in node.names:
                        yield rel, node.module, alias.name


def test_names_imported_from_a_wing_are_in_its_all():
    found = list(_imports_into_wings())
    assert found, 'no import from bpt_mm.whitening/analysis was found'
    unlisted = sorted({(module, name, rel) for rel, module, name in found
                       if name not in importlib.import_module(module).__all__})
    assert not unlisted, ('imported from outside the wing but not in the '
                          f"module's __all__: {unlisted}")
