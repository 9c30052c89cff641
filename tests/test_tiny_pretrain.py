"""bpt_mm.testing.tiny_pretrain: the demo's generated "pretrained" tiny ViT
(CPU)."""
import json
import os.path as osp

import pytest
import torch
from mmengine.config import ConfigDict

from bpt_mm.models.checkpoint import load_checkpoint_file
from bpt_mm.models.vit import PromptedViT
from bpt_mm.testing.tiny_data import MANIFEST_NAME, ensure_tiny_data
from bpt_mm.testing.tiny_pretrain import (ensure_tiny_pretrained,
                                          pretrain_tiny_vit)

BACKBONE = dict(type='PromptedViT',
                arch=dict(embed_dims=32, num_layers=2, num_heads=2,
                          mlp_ratio=2.0),
                img_size=64, patch_size=16, frozen=True,
                prompt=dict(type='BilinearPrompt', num_tokens=4, rank=4))
MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny')
    return ensure_tiny_data(str(root), num_train=4, num_val=1,
                            coco=dict(image_size=(64, 48)))['coco']


def _ensure(path, coco, **kwargs):
    # a ConfigDict, as the demo passes cfg.model.backbone: the file must
    # still hold only plain values (weights-only loadable)
    return ensure_tiny_pretrained(
        str(path), ConfigDict(BACKBONE), coco['train_img_dir'],
        coco['train_ann_file'],
        MEAN, STD, data_manifest=osp.join(coco['root'], MANIFEST_NAME),
        **kwargs)


def test_proxy_task_learns_and_weights_load_frozen(coco, tmp_path):
    """The proxy accuracy rises above the untrained one and the file loads
    into a prompted, frozen PromptedViT through init_cfg."""
    untrained = pretrain_tiny_vit(BACKBONE, coco['train_img_dir'],
                                  coco['train_ann_file'], MEAN, STD, iters=1)
    out = _ensure(tmp_path / 'vit.pth', coco, iters=60)
    assert out['generated']
    assert out['meta']['final_loss'] < untrained['meta']['final_loss']
    assert out['meta']['foreground_cell_accuracy'] > 0.5
    state = load_checkpoint_file(out['path'])['state_dict']
    assert not any(k.startswith('prompts.') for k in state)
    vit = PromptedViT(**{k: v for k, v in BACKBONE.items() if k != 'type'},
                      init_cfg=dict(type='Pretrained', checkpoint=out['path']))
    vit.init_weights()
    assert vit.pretrained_loaded
    assert torch.equal(vit.patch_embed.proj.weight,
                       state['patch_embed.proj.weight'])
    assert not vit.patch_embed.proj.weight.requires_grad


def test_reused_when_current_remade_when_recipe_changes(coco, tmp_path):
    path = tmp_path / 'vit.pth'
    first = _ensure(path, coco, iters=2)
    assert first['generated']
    mtime = path.stat().st_mtime_ns
    again = _ensure(path, coco, iters=2)
    assert not again['generated'] and path.stat().st_mtime_ns == mtime
    remade = _ensure(path, coco, iters=3)
    assert remade['generated']
    recipe = json.loads((tmp_path / 'vit.pth.json').read_text())['recipe']
    assert recipe['iters'] == 3


def test_a_file_it_did_not_make_is_left_alone(coco, tmp_path):
    path = tmp_path / 'vit.pth'
    path.write_bytes(b'my own weights')
    with pytest.raises(ValueError, match='was not made by bpt_mm.tiny_pre'):
        _ensure(path, coco, iters=2)
    assert path.read_bytes() == b'my own weights'
    # a manifest of this module whose digest no longer matches the file
    # (the user replaced the file) is refused too
    other = tmp_path / 'other.pth'
    _ensure(other, coco, iters=2)
    other.write_bytes(b'replaced by the user')
    with pytest.raises(ValueError, match='left as it is'):
        _ensure(other, coco, iters=2)
    assert other.read_bytes() == b'replaced by the user'
