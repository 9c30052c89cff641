"""Checkpoint names as mmengine accepts them (bpt_mm.models.checkpoint_source).

URLs are served by a local HTTP server (no network needed); model-zoo
names through ``$MMENGINE_HOME/open_mmlab.json``, which mmengine reads for
``open-mmlab://`` names. A download is read by the same weights-only
readers as a local file, so a pickle that would run code is refused.
"""
import copy
import functools
import http.server
import json
import os
import threading

import pytest
import torch
from mmengine.runner.checkpoint import CheckpointLoader

import bpt_mm  # noqa: F401  installs the loaders
from bpt_mm.models import PromptedViT
from bpt_mm.models.checkpoint import CheckpointError
from bpt_mm.models.checkpoint_source import local_checkpoint
from bpt_mm.models.frozen_state import parse_extra_state
from helpers import small_vit

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


def test_model_zoo_names_resolve_through_mmengines_tables(
        tmp_path, monkeypatch):
    home = tmp_path / 'mmengine_home'
    home.mkdir()
    torch.save({'model': vit().state_dict()}, home / 'my_vit.pth')
    with open(home / 'open_mmlab.json', 'w') as f:
        json.dump({'my_vit': 'my_vit.pth'}, f)
    monkeypatch.setenv('MMENGINE_HOME', str(home))
    assert local_checkpoint('open-mmlab://my_vit') == str(home / 'my_vit.pth')
    vit(dict(type='Pretrained', checkpoint='open-mmlab://my_vit')
        ).init_weights()
    with pytest.raises(KeyError, match='no_such_model'):
        local_checkpoint('open-mmlab://no_such_model')
    with pytest.raises(ValueError, match='s3://bucket/vit.pth'):
        local_checkpoint('s3://bucket/vit.pth')
    assert local_checkpoint('relative/vit.pth') == 'relative/vit.pth'


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
