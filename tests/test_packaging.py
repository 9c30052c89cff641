"""The wheel: built as a user builds it, installed into a temporary
folder (never into the test environment), used from another directory."""
import os
import os.path as osp
import shutil
import subprocess
import sys
import zipfile

import pytest

import bpt_mm
from bpt_mm.package_files import config_path

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

#: What a user of the installed package runs, from a directory that is
#: not a checkout (the installed bpt_mm must be the one imported).
USE_INSTALLED = r'''
import os, sys
import bpt_mm
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
assert bpt_mm.__file__.startswith(sys.argv[1]), bpt_mm.__file__
for name in ('mask_rcnn_bpt.py', 'tiny/mask_rcnn_bpt_tiny.py'):
    path = bpt_mm.config_path(name)
    assert path.startswith(sys.argv[1]), path
    cfg = Config.fromfile(path)
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    print(name, type(model).__name__, type(model.backbone).__name__,
          model.backbone.embed_dims)
# another project's config inheriting an installed one by its path
with open('mine.py', 'w') as f:
    f.write(f"_base_ = [{bpt_mm.config_path('tiny/upernet_bpt_tiny.py')!r}]\n"
            "model = dict(decode_head=dict(num_classes=5))\n")
cfg = Config.fromfile('mine.py')
init_default_scope(cfg.default_scope)
model = MODELS.build(cfg.model)
print('mine.py', type(model.backbone).__name__,
      model.decode_head.num_classes)
tools = os.path.join(os.path.dirname(bpt_mm.__file__), '.mim', 'tools')
print('tools', sorted(os.listdir(tools)))
'''


def test_wheel_ships_every_config_and_the_tools_and_they_load(tmp_path):
    src = tmp_path / 'src'
    # A copy: building writes build/ and *.egg-info beside setup.py.
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        '.git', '.venv', 'build', 'dist', '*.egg-info', 'work_dirs', 'data',
        '__pycache__', '.pytest_cache', '*.pth', '.mim'))
    wheels = tmp_path / 'wheels'
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '.', '--no-deps',
                    '--no-build-isolation', '-q', '-w', str(wheels)],
                   cwd=str(src), check=True, capture_output=True)
    wheel, = list(wheels.glob('bpt_mm-*.whl'))
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {osp.relpath(osp.join(d, f), osp.join(ROOT, 'configs'))
               for d, _, files in os.walk(osp.join(ROOT, 'configs'))
               for f in files if f.endswith('.py')}
    assert len(configs) > 50  # the _base_ files are in the walk
    for rel in configs:
        assert f'bpt_mm/.mim/configs/{rel}' in names, rel
    for tool in ('train.py', 'test.py', 'dist_train.sh', 'demo.py'):
        assert f'bpt_mm/.mim/tools/{tool}' in names, tool
    # every module of the package, subpackages included (find_packages
    # needs their __init__.py)
    modules = {osp.relpath(osp.join(d, f), ROOT).replace(os.sep, '/')
               for d, dirs, files in os.walk(osp.join(ROOT, 'bpt_mm'))
               if '.mim' not in d and '__pycache__' not in d
               for f in files if f.endswith('.py')}
    assert {'bpt_mm/analysis/report.py',
            'bpt_mm/engine/trainable_state.py'} <= modules
    assert sorted(modules - names) == []
    meta = zipfile.ZipFile(wheel).read(next(
        n for n in names if n.endswith('METADATA'))).decode()
    assert 'Classifier: Programming Language :: Python :: 3.11' in meta
    assert 'Requires-Dist: mmdet' in meta
    # the source tree is left alone
    assert not (src / 'bpt_mm' / '.mim').exists()

    target = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps',
                    '-q', '--target', str(target), str(wheel)], check=True,
                   capture_output=True)
    elsewhere = tmp_path / 'project'
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS='1')
    out = subprocess.run([sys.executable, '-c', USE_INSTALLED,
                          str(target)], cwd=str(elsewhere), env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'mask_rcnn_bpt.py MaskRCNN PromptedViT 768' in out.stdout
    assert 'tiny/mask_rcnn_bpt_tiny.py MaskRCNN PromptedViT 64' in out.stdout
    assert 'mine.py PromptedViT 5' in out.stdout
    assert "'test.py'" in out.stdout


def test_config_path_in_a_checkout(tmp_path):
    # realpath: a checkout set up by an older setup.py may still have the
    # link bpt_mm/.mim/configs -> configs, which leads to the same files.
    path = config_path('tiny/upernet_bpt_tiny')
    assert osp.realpath(path) == osp.join(ROOT, 'configs', 'tiny',
                                          'upernet_bpt_tiny.py')
    assert osp.realpath(bpt_mm.config_path('mask_rcnn_bpt.py')) == \
        osp.join(ROOT, 'configs', 'mask_rcnn_bpt.py')
    with pytest.raises(FileNotFoundError, match=r"did you mean \['mask"):
        config_path('mask_rcnn_bpt_tyni.py')
