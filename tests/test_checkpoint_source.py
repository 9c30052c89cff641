"""Checkpoint names as mmengine accepts them (bpt_mm.models.checkpoint_source).

URLs are served by a local HTTP server (no network needed); model-zoo
names through ``$MMENGINE_HOME/open_mmlab.json``, which mmengine reads for
``open-mmlab://`` names; file-backend names by a test-only mmengine file
backend (``memtest://``) serving bytes from a dict. Whatever the route, the
file is read by the same weights-only readers as a local file, so a pickle
that would run code is refused.
"""
import copy
import functools
import http.server
import io
import json
import logging
import os
import tempfile
import threading
import warnings
import zipfile
from typing import Dict

import pytest
import torch
from mmengine.fileio import BaseStorageBackend, register_backend
from mmengine.fileio.backends import registry_utils
from mmengine.runner.checkpoint import CheckpointLoader, load_checkpoint

import bpt_mm  # noqa: F401  installs the loaders
from bpt_mm.models import PromptedViT
from bpt_mm.models.checkpoint import CheckpointError
from bpt_mm.models.checkpoint_source import local_checkpoint
from bpt_mm.models.frozen_state import parse_extra_state
from helpers import TINY, load_tool, no_val, small_vit, write_config
from whitening_toy import BPTWhiteningToyModel, toy_runner

ARCH = dict(embed_dims=32, num_layers=2, num_heads=2, mlp_ratio=1.0)


def vit(init_cfg=None, pretrained=None) -> PromptedViT:
    """The small ViT with 2 blocks, loading ``init_cfg``/``pretrained``."""
    return small_vit(arch=ARCH, init_cfg=init_cfg, pretrained=pretrained)


class _Server(http.server.SimpleHTTPRequestHandler):
    requests = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        _Server.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """(folder served over HTTP, base URL); torch's hub cache in tmp."""
    folder = tmp_path / 'www'
    folder.mkdir()
    handler = functools.partial(_Server, directory=str(folder))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / 'hub'))
    _Server.requests.clear()
    try:
        yield folder, f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        torch.hub.set_dir(hub)
        server.shutdown()
        server.server_close()


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


def test_url_in_init_cfg_loads_like_the_local_file(served, one_thread):
    folder, url = served
    torch.manual_seed(1)
    source = vit()
    torch.save({'model': source.state_dict()}, folder / 'vit.pth')
    remote = vit(dict(type='Pretrained', checkpoint=f'{url}/vit.pth'))
    remote.init_weights()
    for key, value in source.state_dict().items():
        if key != '_extra_state':  # the record says where each came from
            assert torch.equal(remote.state_dict()[key], value), key
    # downloaded once, then read from the cache
    vit(dict(type='Pretrained', checkpoint=f'{url}/vit.pth')).init_weights()
    assert _Server.requests == ['/vit.pth']
    record = parse_extra_state(remote.get_extra_state(), 'record')
    assert record['pretrained_checkpoint'] == f'{url}/vit.pth'


def test_downloads_are_read_weights_only(served, tmp_path):
    folder, url = served
    marker = tmp_path / 'PWNED'
    torch.save({'x': RunsCode(marker), 'model': vit().state_dict()},
               folder / 'evil.pth')
    # as init_cfg ...
    with pytest.raises(CheckpointError, match='refusing to execute code'):
        vit(dict(type='Pretrained',
                 checkpoint=f'{url}/evil.pth')).init_weights()
    # ... and as load_from (mmengine's CheckpointLoader, whose own http
    # loader would unpickle with weights_only=False)
    with pytest.raises(CheckpointError, match='refusing to execute code'):
        CheckpointLoader.load_checkpoint(f'{url}/evil.pth')
    assert not marker.exists()
    # a plain one loads through the same route
    weights = {'w': torch.arange(3.)}
    torch.save({'state_dict': weights}, folder / 'fine.pth')
    ckpt = CheckpointLoader.load_checkpoint(f'{url}/fine.pth')
    assert torch.equal(ckpt['state_dict']['w'], weights['w'])


def test_a_failed_download_names_the_url(served):
    """A URL the server does not have (404): the error names the URL
    (urllib's own message does not)."""
    _, base = served
    url = f'{base}/missing.pth'
    for load in (lambda: CheckpointLoader.load_checkpoint(url),
                 lambda: vit(dict(type='Pretrained',
                                  checkpoint=url)).init_weights()):
        with pytest.raises(OSError, match=(
                rf"cannot download checkpoint '{url}' .*HTTP Error 404")):
            load()


def test_model_zoo_names_resolve_through_mmengines_tables(
        tmp_path, monkeypatch):
    home = tmp_path / 'mmengine_home'
    home.mkdir()
    torch.save({'model': vit().state_dict()}, home / 'my_vit.pth')
    with open(home / 'open_mmlab.json', 'w') as f:
        json.dump({'my_vit': 'my_vit.pth'}, f)
    monkeypatch.setenv('MMENGINE_HOME', str(home))
    with local_checkpoint('open-mmlab://my_vit') as path:
        assert path == str(home / 'my_vit.pth')
    vit(dict(type='Pretrained', checkpoint='open-mmlab://my_vit')
        ).init_weights()
    with pytest.raises(KeyError, match='no_such_model'), \
            local_checkpoint('open-mmlab://no_such_model'):
        pass
    # mmengine's s3 backend needs petrel_client, not installed here
    with pytest.raises(ValueError, match='s3://bucket/vit.pth'), \
            local_checkpoint('s3://bucket/vit.pth'):
        pass
    with local_checkpoint('relative/vit.pth') as path:
        assert path == 'relative/vit.pth'


# ---------------------------------------------------------------------------
# Names served by an mmengine file backend (s3://, petrel://, registered)
# ---------------------------------------------------------------------------
class _MemoryBackend(BaseStorageBackend):
    """A test-only mmengine file backend serving bytes from a dict."""
    files: Dict[str, bytes] = {}

    def get(self, filepath) -> bytes:
        if str(filepath) not in self.files:
            raise FileNotFoundError(f'no such object: {filepath}')
        return self.files[str(filepath)]

    def get_text(self, filepath, encoding='utf-8') -> str:
        return self.get(filepath).decode(encoding)


@pytest.fixture
def memtest(tmp_path, monkeypatch):
    """The ``memtest://`` prefix served from a dict (name -> bytes), and
    temporary files made in ``tmp_path / 'tmp'`` (empty again after each
    read)."""
    register_backend('memtest', _MemoryBackend, prefixes='memtest',
                     force=True)
    scratch = tmp_path / 'tmp'
    scratch.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
    try:
        yield _MemoryBackend.files, scratch
    finally:
        _MemoryBackend.files.clear()
        registry_utils.backends.pop('memtest', None)
        registry_utils.prefix_to_backends.pop('memtest', None)


def saved_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def with_a_member_twice(data: bytes) -> bytes:
    """The zip archive ``data`` with its first member written twice."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, \
            zipfile.ZipFile(out, 'w') as dst:
        infos = src.infolist()
        for info in infos:
            dst.writestr(info, src.read(info))
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # zipfile: duplicate name
            dst.writestr(infos[0], src.read(infos[0]))
    return out.getvalue()


def test_file_backend_checkpoint_read_like_a_local_file(memtest, tmp_path,
                                                         one_thread):
    files, scratch = memtest
    torch.manual_seed(1)
    source = vit()
    files['memtest://bucket/vit.pth'] = saved_bytes(
        {'model': source.state_dict()})
    files['memtest://bucket/ckpt.pth'] = saved_bytes(
        {'state_dict': source.state_dict(), 'meta': {'iter': 2}})
    marker = tmp_path / 'PWNED'
    files['memtest://bucket/evil.pth'] = saved_bytes(
        {'x': RunsCode(marker), 'model': source.state_dict()})
    files['memtest://bucket/twice.pth'] = with_a_member_twice(
        files['memtest://bucket/vit.pth'])

    def same_weights(model):
        return all(torch.equal(model.state_dict()[k], v)
                   for k, v in source.state_dict().items()
                   if k != '_extra_state')

    # init_cfg=dict(type='Pretrained', ...)
    remote = vit(dict(type='Pretrained',
                      checkpoint='memtest://bucket/vit.pth'))
    remote.init_weights()
    assert same_weights(remote)
    record = parse_extra_state(remote.get_extra_state(), 'record')
    assert record['pretrained_checkpoint'] == 'memtest://bucket/vit.pth'
    # mmengine's load_checkpoint (what load_from and tools/test.py use),
    # also with a cluster name before the prefix, as mmengine allows
    for name in ('memtest://bucket/ckpt.pth',
                 'cluster:memtest://bucket/ckpt.pth',
                 # a key ending in a folder-like name (a file name here)
                 'memtest://bucket/..', 'memtest://bucket/.',
                 'memtest://bucket/'):
        if name != 'memtest://bucket/ckpt.pth':
            files[name] = files['memtest://bucket/ckpt.pth']
        model = vit()
        load_checkpoint(model, name, map_location='cpu')
        assert same_weights(model), name
    assert not list(scratch.iterdir()), 'temporary copies left behind'

    # refused exactly as a local file, the message naming the remote name
    routes = {
        'init_cfg': lambda name: vit(dict(type='Pretrained',
                                          checkpoint=name)).init_weights(),
        'load_checkpoint': lambda name: load_checkpoint(vit(), name),
    }
    for route, load in routes.items():
        with pytest.raises(CheckpointError, match=(
                r"refusing to execute code from .*'memtest://bucket/"
                r"evil\.pth'")):
            load('memtest://bucket/evil.pth')
        with pytest.raises(CheckpointError, match=(
                r"'memtest://bucket/twice\.pth': its zip archive holds "
                r'members of the same name more than once')):
            load('memtest://bucket/twice.pth')
        with pytest.raises(FileNotFoundError, match='memtest://bucket/none'):
            load('memtest://bucket/none.pth')
    assert not marker.exists()
    assert not list(scratch.iterdir()), 'temporary copies left behind'


def test_pretrained_log_line_names_the_checkpoint_the_user_gave(
        memtest, one_thread):
    # It named the temporary copy (/tmp/bpt_mm_ckpt_.../vit.pth), deleted
    # by the time anyone reads the log.
    files, scratch = memtest
    files['memtest://bucket/vit.pth'] = saved_bytes(
        {'model': vit().state_dict()})
    lines = []

    class Lines(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    handler, level = Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        vit(dict(type='Pretrained',
                 checkpoint='memtest://bucket/vit.pth')).init_weights()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    loaded = [line for line in lines if 'tensors loaded from' in line]
    assert len(loaded) == 1, lines
    assert 'tensors loaded from memtest://bucket/vit.pth (' in loaded[0], \
        loaded[0]
    assert str(scratch) not in '\n'.join(lines)


def test_file_backend_checkpoint_as_load_from(memtest, tmp_path,
                                              one_thread):
    files, _ = memtest
    torch.manual_seed(2)
    source = BPTWhiteningToyModel(backbone=dict())
    files['memtest://runs/iter_2.pth'] = saved_bytes(
        {'state_dict': source.state_dict(), 'meta': {'iter': 2}})
    files['memtest://runs/evil.pth'] = saved_bytes(
        {'state_dict': {'x': RunsCode(tmp_path / 'PWNED')}})
    runner = toy_runner(tmp_path / 'good',
                        load_from='memtest://runs/iter_2.pth')
    runner.load_or_resume()  # what Runner.train() does before training
    for key, value in source.state_dict().items():
        assert torch.equal(runner.model.state_dict()[key], value), key
    runner = toy_runner(tmp_path / 'evil', load_from='memtest://runs/evil.pth')
    with pytest.raises(CheckpointError, match=(
            r"refusing to execute code from .*'memtest://runs/evil\.pth'")):
        runner.load_or_resume()
    assert not (tmp_path / 'PWNED').exists()


def test_file_backend_returning_other_than_bytes(memtest, one_thread):
    """A registered backend whose ``get`` returns text or None is refused
    naming the checkpoint and the type; bytearray/memoryview are bytes."""
    files, scratch = memtest
    data = saved_bytes({'state_dict': vit().state_dict(), 'meta': {}})
    files.update({'memtest://b/none.pth': None, 'memtest://b/text.pth': 'x',
                  'memtest://b/array.pth': bytearray(data),
                  'memtest://b/view.pth': memoryview(data)})
    routes = [lambda name: vit(dict(type='Pretrained',
                                    checkpoint=name)).init_weights(),
              lambda name: load_checkpoint(vit(), name)]
    for load in routes:
        for name, kind in (('none', 'NoneType'), ('text', 'str')):
            with pytest.raises(CheckpointError, match=(
                    rf"'memtest://b/{name}\.pth': mmengine's _MemoryBackend"
                    rf'\.get returned a {kind}, not bytes')):
                load(f'memtest://b/{name}.pth')
        load('memtest://b/array.pth')
        load('memtest://b/view.pth')
    assert not list(scratch.iterdir()), 'temporary copies left behind'


def test_tools_take_file_backend_checkpoints(memtest, tiny_workspace,
                                             tmp_path, monkeypatch):
    """tools/test.py CONFIG NAME and tools/train.py --resume NAME read a
    file-backend name like load_from does (they used to refuse it as a
    missing local file); a prefix nothing serves is refused by name before
    anything is built."""
    files, scratch = memtest
    monkeypatch.chdir(tiny_workspace)

    def edit(cfg):
        cfg.train_cfg.max_iters = 2
        cfg.default_hooks.checkpoint.interval = 1
        no_val(cfg)

    config = str(write_config(tmp_path, TINY['mask_rcnn'], edit))
    load_tool('train').main([config, '--work-dir', str(tmp_path / 'w'),
                             '--cfg-options', 'train_cfg.max_iters=1'])
    local = tmp_path / 'w' / 'iter_1.pth'
    files['memtest://runs/iter_1.pth'] = local.read_bytes()

    test = load_tool('test')
    expected = test.main([config, str(local),
                          '--work-dir', str(tmp_path / 'test_local')])
    got = test.main([config, 'memtest://runs/iter_1.pth',
                     '--work-dir', str(tmp_path / 'test_remote')])
    assert got and got == expected
    load_tool('train').main([config, '--work-dir', str(tmp_path / 'w2'),
                             '--resume', 'memtest://runs/iter_1.pth'])
    resumed = torch.load(tmp_path / 'w2' / 'iter_2.pth', weights_only=False)
    assert resumed['meta']['iter'] == 2
    assert not (tmp_path / 'w2' / 'iter_1.pth').exists()  # it resumed
    assert not list(scratch.iterdir()), 'temporary copies left behind'

    refused = r"no mmengine file backend serves the prefix 'pavi://'"
    with pytest.raises(ValueError, match=refused):
        test.main([config, 'pavi://runs/iter_1.pth',
                   '--work-dir', str(tmp_path / 'pavi')])
    with pytest.raises(ValueError, match=refused):
        load_tool('train').main([config, '--work-dir', str(tmp_path / 'w3'),
                                 '--resume', 'pavi://runs/iter_1.pth'])
    assert not (tmp_path / 'pavi').exists()
    assert not (tmp_path / 'w3').exists()


def test_auto_resume_takes_a_file_backend_name_in_the_marker(memtest,
                                                             tmp_path):
    """A CheckpointHook with out_dir='s3://...' writes the remote name into
    the local last_checkpoint marker; --resume without a path resumes from
    it, as mmengine's own auto-resume does (it used to refuse it as a
    missing file)."""
    from bpt_mm.launch import latest_checkpoint
    files, _ = memtest
    (tmp_path / 'last_checkpoint').write_text('memtest://runs/iter_2.pth')
    files['memtest://runs/iter_2.pth'] = b'not read here'
    assert latest_checkpoint(str(tmp_path)) == 'memtest://runs/iter_2.pth'
    (tmp_path / 'last_checkpoint').write_text('pavi://runs/iter_2.pth')
    with pytest.raises(ValueError, match="prefix 'pavi://'"):
        latest_checkpoint(str(tmp_path))


def test_a_projects_own_scheme_survives_the_install():
    """A loader a project registers with CheckpointLoader.register_scheme
    before bpt_mm installs its loaders (custom_imports=['myproj',
    'bpt_mm']) keeps its scheme, as one registered after does; it used to
    be replaced, and then refused as an unknown prefix."""
    from bpt_mm.mmengine_patches import (install_mmengine_patches,
                                         installed_patches)

    def load_from_myzoo(filename, map_location=None):
        return {'state_dict': {'from': filename}}

    CheckpointLoader.register_scheme('myzoo://', load_from_myzoo)
    try:
        install_mmengine_patches()  # what `import bpt_mm` does
        assert CheckpointLoader.load_checkpoint('myzoo://m/1') == {
            'state_dict': {'from': 'myzoo://m/1'}}
        assert installed_patches()['remote_loaders']
        with pytest.raises(ValueError, match="prefix 'pavi://'"):
            CheckpointLoader.load_checkpoint('pavi://m/1')
    finally:
        CheckpointLoader._schemes.pop('myzoo://')


@pytest.mark.parametrize('name', ['pavi://models/vit.pth',
                                  'nosuch://bucket/vit.pth'])
def test_prefix_without_a_file_backend_is_refused_by_name(name):
    prefix = name.split('://')[0] + '://'
    pattern = (rf"checkpoint '{name}': no mmengine file backend serves the "
               rf"prefix '{prefix}'.*download the file.*register_backend")
    with pytest.raises(ValueError, match=pattern):
        CheckpointLoader.load_checkpoint(name)
    with pytest.raises(ValueError, match=pattern):
        vit(dict(type='Pretrained', checkpoint=name)).init_weights()


def test_mmseg_base_pretrained_is_refused_at_build(tmp_path):
    """A config on an mmseg model base (which sets
    model.pretrained='open-mmlab://resnet50_v1c') with PromptedViT swapped
    in: refused at build, saying to set pretrained=None; fine with it."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    config = tmp_path / 'cfg.py'
    config.write_text(
        "_base_ = 'mmseg::_base_/models/upernet_r50.py'\n"
        "custom_imports = dict(imports=['bpt_mm'])\n"
        "norm_cfg = dict(type='BN', requires_grad=True)\n"
        "model = dict(\n"
        "    data_preprocessor=dict(size=(32, 32)),\n"
        "    backbone=dict(_delete_=True, type='PromptedViT',\n"
        f"        arch={ARCH!r}, img_size=32, patch_size=8,\n"
        "        out_indices=(0, 1)),\n"
        "    neck=dict(type='MultiLevelNeck', in_channels=[32, 32],\n"
        "              out_channels=32, scales=[1, 1]),\n"
        "    decode_head=dict(in_channels=[32, 32], in_index=[0, 1],\n"
        "        channels=16, num_classes=3, pool_scales=(1, 2),\n"
        "        norm_cfg=norm_cfg),\n"
        "    auxiliary_head=None)\n")
    cfg = Config.fromfile(str(config))
    assert cfg.model.pretrained == 'open-mmlab://resnet50_v1c'
    init_default_scope('mmseg')
    # (mmseg's EncoderDecoder writes `pretrained` into the backbone's
    # config it is given: each build gets a copy)
    with pytest.raises(ValueError, match=r'model\.pretrained=None'):
        MODELS.build(copy.deepcopy(cfg.model))
    cfg.model.pretrained = None
    model = MODELS.build(copy.deepcopy(cfg.model))
    assert type(model.backbone).__name__ == 'PromptedViT'
