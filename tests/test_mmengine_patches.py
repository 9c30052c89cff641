"""What importing bpt_mm changes in mmengine, and the opt-out that leaves
mmengine as it is (bpt_mm/mmengine_patches.py)."""
import json
import os
import subprocess
import sys

import pytest

REPORT = r'''
import json, os, sys, tempfile
import mmengine.runner.runner as runner_module
from mmengine.fileio.backends.registry_utils import backends
from mmengine.runner.checkpoint import CheckpointLoader
stock = dict(local=CheckpointLoader._schemes[''],
             save=runner_module.save_checkpoint, backend=backends['local'])
import bpt_mm
from bpt_mm.mmengine_patches import installed_patches
import torch
# A plain checkpoint written and read back through mmengine's own API.
path = os.path.join(tempfile.mkdtemp(), 'x.pth')
runner_module.save_checkpoint({'state_dict': {'w': torch.ones(2)}}, path)
back = CheckpointLoader.load_checkpoint(path, map_location='cpu')
print(json.dumps(dict(
    installed=installed_patches(),
    untouched=dict(
        local=CheckpointLoader._schemes[''] is stock['local'],
        save=runner_module.save_checkpoint is stock['save'],
        backend=backends['local'] is stock['backend']),
    roundtrip=back['state_dict']['w'].tolist(),
    models=[bpt_mm.models.PromptedViT.__name__])))
'''


def report(value):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('BPT_MM_PATCH_MMENGINE', None)
    if value is not None:
        env['BPT_MM_PATCH_MMENGINE'] = value
    out = subprocess.run([sys.executable, '-c', REPORT], env=env,
                         capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__))))
    return out


def test_import_patches_mmengine_by_default():
    out = report(None)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert all(result['installed'].values()), result
    assert not any(result['untouched'].values()), result
    assert result['roundtrip'] == [1.0, 1.0]


def test_opt_out_leaves_mmengine_as_it_is():
    out = report('0')
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert not any(result['installed'].values()), result
    assert all(result['untouched'].values()), result
    # mmengine's own save and load still work as before
    assert result['roundtrip'] == [1.0, 1.0]
    assert result['models'] == ['PromptedViT']


def test_a_bad_opt_out_value_is_named():
    out = report('maybe')
    assert out.returncode != 0
    assert 'BPT_MM_PATCH_MMENGINE must be 1' in out.stderr
    assert "'maybe'" in out.stderr


@pytest.mark.parametrize('value,expected', [
    ('1', True), ('true', True), ('0', False), ('No', False)])
def test_patching_enabled_reads_the_variable(monkeypatch, value, expected):
    from bpt_mm.mmengine_patches import patching_enabled
    monkeypatch.setenv('BPT_MM_PATCH_MMENGINE', value)
    assert patching_enabled() is expected


def test_saves_write_through_a_symbolic_link(tmp_path):
    """A checkpoint path that is the user's symbolic link: the atomic save
    replaces the link's target, as mmengine's stock backend writes through
    it, and the link stays (the rename used to replace the link itself)."""
    import torch
    import mmengine.runner.runner as runner_module
    from mmengine.fileio import put_text

    import bpt_mm  # noqa: F401
    storage = tmp_path / 'storage'
    storage.mkdir()
    (storage / 'latest.pth').write_bytes(b'old')
    (storage / 'marker').write_text('old')
    work = tmp_path / 'work'
    work.mkdir()
    (work / 'latest.pth').symlink_to(storage / 'latest.pth')
    (work / 'marker').symlink_to(storage / 'marker')
    runner_module.save_checkpoint({'state_dict': {'w': torch.ones(2)}},
                                  str(work / 'latest.pth'))
    put_text('new', str(work / 'marker'))
    for name in ('latest.pth', 'marker'):
        assert (work / name).is_symlink(), name
    assert sorted(p.name for p in storage.iterdir()) == ['latest.pth',
                                                         'marker']
    assert (storage / 'marker').read_text() == 'new'
    saved = torch.load(storage / 'latest.pth', weights_only=True)
    assert saved['state_dict']['w'].tolist() == [1.0, 1.0]
