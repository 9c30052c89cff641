"""tools/venv_on_top.py: a venv made on top of another venv sees its
packages (the existing-OpenMMLab-environment route of set-up), its own
first."""
import importlib.util
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SCRIPT = osp.join(ROOT, 'tools', 'venv_on_top.py')


def _load():
    spec = importlib.util.spec_from_file_location('venv_on_top', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _venv(path, python, *flags):
    subprocess.run([python, '-m', 'venv', '--without-pip', *flags,
                    str(path)], check=True, timeout=120)
    exe = str(path / 'bin' / 'python')
    site = subprocess.run(
        [exe, '-c', 'import sysconfig; print(sysconfig.get_paths()'
         '["purelib"])'], capture_output=True, text=True, check=True
    ).stdout.strip()
    return exe, site


def _import(exe, module):
    out = subprocess.run([exe, '-c', f'import {module}; print({module}.X)'],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or out.stderr.strip().splitlines()[-1]


def test_venv_on_a_venv_sees_its_packages_after_its_own(tmp_path):
    base_exe, base_site = _venv(tmp_path / 'openmmlab', sys.executable)
    with open(osp.join(base_site, 'bpt_probe_base_only.py'), 'w') as f:
        f.write("X = 'base'\n")
    with open(osp.join(base_site, 'bpt_probe_both.py'), 'w') as f:
        f.write("X = 'base'\n")
    new_exe, new_site = _venv(tmp_path / 'new', base_exe,
                              '--system-site-packages')
    with open(osp.join(new_site, 'bpt_probe_both.py'), 'w') as f:
        f.write("X = 'new'\n")
    # what --system-site-packages alone gives: not the venv's packages
    assert 'No module named' in _import(new_exe, 'bpt_probe_base_only')

    subprocess.run([base_exe, SCRIPT, new_site], check=True, timeout=60)
    assert _import(new_exe, 'bpt_probe_base_only') == 'base'
    assert _import(new_exe, 'bpt_probe_both') == 'new'


def test_nothing_written_for_a_plain_interpreter(tmp_path, monkeypatch):
    module = _load()
    monkeypatch.setattr(sys, 'prefix', sys.base_prefix)
    assert module.own_site_dirs() == []
    assert module.write_pth(str(tmp_path), []) is None
    assert not list(tmp_path.iterdir())


def test_missing_target_is_named(tmp_path):
    module = _load()
    with pytest.raises(FileNotFoundError, match='no site-packages folder'):
        module.write_pth(str(tmp_path / 'absent'), ['/x'])
    out = subprocess.run([sys.executable, SCRIPT], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and 'usage' in out.stderr


@pytest.mark.parametrize('flag', ['-h', '--help'])
def test_help_is_answered_not_taken_for_a_folder(flag, tmp_path):
    out = subprocess.run([sys.executable, SCRIPT, flag], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith('usage: python tools/venv_on_top.py')
    assert '--system-site-packages' in out.stdout
    assert not list(tmp_path.iterdir())
