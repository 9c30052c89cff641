"""tools/setup_env.sh refuses bad environments before installing anything."""
import os
import os.path as osp
import subprocess

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SCRIPT = osp.join(ROOT, 'tools', 'setup_env.sh')


def run_setup(tmp_path, **env):
    full_env = dict(os.environ, VENV=str(tmp_path / 'venv'),
                    BPT_MM_CACHE=str(tmp_path / 'cache'), **env)
    return subprocess.run(['bash', SCRIPT], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_unsupported_python_is_named(tmp_path):
    fake = tmp_path / 'python3.9'
    fake.write_text('#!/bin/sh\necho 3.9\n')
    fake.chmod(0o755)
    out = run_setup(tmp_path, PYTHON=str(fake))
    assert out.returncode != 0
    assert 'Python 3.9 is not supported' in out.stderr
    assert '3.10, 3.11 or 3.12' in out.stderr
    assert not (tmp_path / 'venv').exists()


def test_missing_interpreter_is_named(tmp_path):
    out = run_setup(tmp_path, PYTHON='no-such-python')
    assert out.returncode != 0
    assert "no Python interpreter 'no-such-python'" in out.stderr


def test_missing_compiler_stops_before_installing(tmp_path):
    # A Python 3.11 without mmcv (a stand-in that answers the version query
    # and fails the mmcv probe), an empty wheel cache and a new venv: mmcv
    # would have to be compiled, so a missing compiler must stop set-up
    # before the venv (and its 5 GB of torch) is made.
    fake = tmp_path / 'python3.11'
    fake.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then echo 3.11; exit 0; '
                    'fi\nexit 1\n')
    fake.chmod(0o755)
    out = run_setup(tmp_path, PYTHON=str(fake), CXX='no-such-compiler')
    assert out.returncode != 0
    assert "no C++ compiler 'no-such-compiler'" in out.stderr
    assert not (tmp_path / 'venv').exists()
    assert not (tmp_path / 'cache').exists()


def test_unknown_mmcv_ops_choice_stops_before_installing(tmp_path):
    out = run_setup(tmp_path, BPT_MM_MMCV_OPS='gpu')
    assert out.returncode != 0
    assert "BPT_MM_MMCV_OPS must be auto, cpu or cuda, got 'gpu'" in out.stderr
    assert not (tmp_path / 'venv').exists()
