"""Every docstring example in the package runs and prints what it shows."""
import doctest
import importlib
import pkgutil
import tempfile

import pytest

import bpt_mm

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(bpt_mm.__path__, 'bpt_mm.'))


@pytest.mark.parametrize('name', MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch, one_thread):
    # Examples that write files use tempfile: keep them in tmp_path.
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS,
                             verbose=False)
    assert result.failed == 0, f'{result.failed} example(s) of {name} failed'
