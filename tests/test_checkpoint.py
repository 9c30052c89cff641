"""Tests for bpt_mm.models.checkpoint: foreign ViT files into timm names.

Every foreign file is written here from a tiny timm ViT with the key names
the real codebases use (timm/DeiT, MAE ``models_mae.py``, MoCo v3
``moco/builder.py``, mmpretrain ``VisionTransformer``, mmseg
``VisionTransformer``), then loaded back into a fresh timm ViT, which has
PromptedViT's parameter names.
"""
import argparse
import logging
import os
import pickle
import re
import warnings

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from bpt_mm.models.checkpoint import (KNOWN_LAYOUTS, CheckpointError,
                                      convert_to_timm_layout, detect_layout,
                                      load_checkpoint_file, load_pretrained,
                                      resample_pos_embed, unwrap_state_dict)

DEPTH = 2


def make_vit(seed=0, embed_dim=32, img_size=32, num_classes=10, **kwargs):
    """A tiny ViT whose every parameter is random.

    LayerNorm weights start at 1 and biases at 0, so a swapped norm1/norm2
    or a lost bias would go unnoticed unless everything is perturbed.
    """
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=img_size, patch_size=8,
                              embed_dim=embed_dim, depth=DEPTH, num_heads=2,
                              num_classes=num_classes, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def encoder_sd(model):
    """timm keys without the classifier head."""
    return {k: v.clone() for k, v in model.state_dict().items()
            if not k.startswith('head.')}


# ------------------------------------------------------ foreign key layouts
# mmpretrain: mmpretrain/models/backbones/vision_transformer.py, and the
# names its deit3/clip converters write.
MMPRETRAIN_BLOCK = {
    'norm1.weight': 'ln1.weight', 'norm1.bias': 'ln1.bias',
    'norm2.weight': 'ln2.weight', 'norm2.bias': 'ln2.bias',
    'attn.qkv.weight': 'attn.qkv.weight', 'attn.qkv.bias': 'attn.qkv.bias',
    'attn.proj.weight': 'attn.proj.weight',
    'attn.proj.bias': 'attn.proj.bias',
    'mlp.fc1.weight': 'ffn.layers.0.0.weight',
    'mlp.fc1.bias': 'ffn.layers.0.0.bias',
    'mlp.fc2.weight': 'ffn.layers.1.weight',
    'mlp.fc2.bias': 'ffn.layers.1.bias',
    'ls1.gamma': 'attn.gamma1.weight', 'ls2.gamma': 'ffn.gamma2.weight',
}
# mmseg: mmseg/models/backbones/vit.py (mmcv MultiheadAttention wraps
# torch.nn.MultiheadAttention as .attn) and tools/model_converters/vit2mmseg.
MMSEG_BLOCK = dict(MMPRETRAIN_BLOCK, **{
    'attn.qkv.weight': 'attn.attn.in_proj_weight',
    'attn.qkv.bias': 'attn.attn.in_proj_bias',
    'attn.proj.weight': 'attn.attn.out_proj.weight',
    'attn.proj.bias': 'attn.attn.out_proj.bias',
})
MM_TOP = {'cls_token': 'cls_token', 'pos_embed': 'pos_embed',
          'patch_embed.proj.weight': 'patch_embed.projection.weight',
          'patch_embed.proj.bias': 'patch_embed.projection.bias',
          'norm.weight': 'ln1.weight', 'norm.bias': 'ln1.bias'}


def to_mm(sd, block_map):
    out = {}
    for k, v in sd.items():
        m = re.match(r'blocks\.(\d+)\.(.+)$', k)
        new = (f'layers.{m.group(1)}.{block_map[m.group(2)]}' if m
               else MM_TOP[k])
        out['backbone.' + new] = v
    return out


def ckpt_timm(src):
    sd = src.state_dict()
    return dict(sd), {'head.weight', 'head.bias'}


def ckpt_deit(src):
    # DeiT's main.py: {'model': ...}; training files also keep 'args'.
    sd = src.state_dict()
    return ({'model': dict(sd), 'epoch': 299,
             'args': argparse.Namespace(model='deit_tiny', lr=5e-4)},
            {'head.weight', 'head.bias'})


def ckpt_deit_distilled(src):
    sd = dict(src.state_dict())
    dim = sd['cls_token'].shape[-1]
    pos = sd['pos_embed']
    # Distilled DeiT positions are [cls, dist, patches...].
    sd['pos_embed'] = torch.cat([pos[:, :1], torch.randn(1, 1, dim),
                                 pos[:, 1:]], dim=1)
    sd['dist_token'] = torch.randn(1, 1, dim)
    sd['head_dist.weight'] = torch.randn(10, dim)
    sd['head_dist.bias'] = torch.randn(10)
    return {'model': sd}, {'head.weight', 'head.bias', 'dist_token',
                           'head_dist.weight', 'head_dist.bias'}


def ckpt_mae(src):
    # models_mae.py MaskedAutoencoderViT, saved by main_pretrain.py.
    sd = encoder_sd(src)
    dec = 16
    extra = {
        'mask_token': torch.randn(1, 1, dec),
        'decoder_embed.weight': torch.randn(dec, 32),
        'decoder_embed.bias': torch.randn(dec),
        'decoder_pos_embed': torch.randn(1, 17, dec),
        'decoder_blocks.0.norm1.weight': torch.randn(dec),
        'decoder_blocks.0.attn.qkv.weight': torch.randn(3 * dec, dec),
        'decoder_blocks.0.mlp.fc1.weight': torch.randn(4 * dec, dec),
        'decoder_norm.weight': torch.randn(dec),
        'decoder_norm.bias': torch.randn(dec),
        'decoder_pred.weight': torch.randn(8 * 8 * 3, dec),
        'decoder_pred.bias': torch.randn(8 * 8 * 3),
    }
    sd.update(extra)
    return ({'model': sd, 'epoch': 799, 'scaler': {'scale': 1024.0},
             'args': argparse.Namespace(model='mae_vit_base_patch16',
                                        mask_ratio=0.75)}, set(extra))


def ckpt_mocov3(src):
    # moco/builder.py MoCo under DistributedDataParallel: base/momentum
    # encoders whose head is a 3-layer projection MLP, plus a predictor.
    enc = encoder_sd(src)
    head = {'head.0.weight': torch.randn(64, 32),
            'head.1.weight': torch.randn(64), 'head.1.bias': torch.randn(64),
            'head.1.running_mean': torch.randn(64),
            'head.1.running_var': torch.rand(64),
            'head.1.num_batches_tracked': torch.tensor(7),
            'head.3.weight': torch.randn(16, 64)}
    predictor = {'predictor.0.weight': torch.randn(64, 16),
                 'predictor.1.running_mean': torch.randn(64),
                 'predictor.3.weight': torch.randn(16, 64)}
    sd = {}
    for k, v in {**enc, **head}.items():
        sd['module.base_encoder.' + k] = v
        sd['module.momentum_encoder.' + k] = v.clone()
    sd.update({'module.' + k: v for k, v in predictor.items()})
    dropped = {k for k in sd if not k.startswith('module.base_encoder.')}
    dropped |= {'module.base_encoder.' + k for k in head}
    return ({'epoch': 300, 'arch': 'vit_small', 'state_dict': sd,
             'optimizer': {'state': {}, 'param_groups': []}}, dropped)


def ckpt_mmpretrain(src):
    sd = to_mm(encoder_sd(src), MMPRETRAIN_BLOCK)
    sd['head.layers.head.weight'] = torch.randn(10, 32)
    sd['head.layers.head.bias'] = torch.randn(10)
    return ({'meta': {'mmpretrain_version': '1.2.0', 'epoch': 300},
             'state_dict': sd},
            {'head.layers.head.weight', 'head.layers.head.bias'})


def ckpt_mmseg(src):
    sd = to_mm(encoder_sd(src), MMSEG_BLOCK)
    extra = {'decode_head.conv_seg.weight': torch.randn(4, 32, 1, 1),
             'decode_head.conv_seg.bias': torch.randn(4),
             'auxiliary_head.conv_seg.weight': torch.randn(4, 32, 1, 1)}
    sd.update(extra)
    return {'meta': {'iter': 160000}, 'state_dict': sd}, set(extra)


LAYOUT_CASES = {
    'timm': (ckpt_timm, 'timm', ''),
    'deit': (ckpt_deit, 'timm', 'model'),
    'deit_distilled': (ckpt_deit_distilled, 'timm', 'model'),
    'mae': (ckpt_mae, 'mae', 'model'),
    'mocov3': (ckpt_mocov3, 'mocov3', 'state_dict'),
    'mmpretrain': (ckpt_mmpretrain, 'mmpretrain', 'state_dict'),
    'mmseg': (ckpt_mmseg, 'mmseg', 'state_dict'),
}


def assert_loaded_like(dst, src):
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    assert {k for k in dst_sd if k not in src_sd} <= {'prompts.0'}
    for k, v in dst_sd.items():
        if k in src_sd:
            assert torch.equal(v, src_sd[k]), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dst.forward_features(x), src.forward_features(x))


@pytest.mark.parametrize('case', sorted(LAYOUT_CASES))
def test_foreign_layouts_load_tensor_for_tensor(case, tmp_path):
    build, layout, container = LAYOUT_CASES[case]
    src = make_vit(seed=0)
    ckpt, expected_dropped = build(src)
    path = tmp_path / f'{case}.pth'
    torch.save(ckpt, path)

    dst = make_vit(seed=1, num_classes=0)
    assert not torch.equal(dst.cls_token, src.cls_token)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a clean load warns about nothing
        info = load_pretrained(dst, str(path))

    assert info['layout'] == layout
    assert info['container'] == container
    assert set(info['dropped']) == expected_dropped
    assert info['missing'] == [] and info['unexpected'] == []
    assert info['new_prompt_keys'] == [] and info['pos_embed_resized'] is None
    assert_loaded_like(dst, src)


@pytest.mark.parametrize('case', ['mmpretrain', 'deit3_original'])
def test_layer_scale_is_mapped(case, tmp_path):
    src = make_vit(seed=0, init_values=0.1)
    if case == 'mmpretrain':
        ckpt, _ = ckpt_mmpretrain(src)
        assert 'backbone.layers.1.ffn.gamma2.weight' in ckpt['state_dict']
    else:  # DeiT-3's own release stores blocks.{i}.gamma_1 / gamma_2
        ckpt = {'model': {re.sub(r'ls([12])\.gamma', r'gamma_\1', k): v
                          for k, v in src.state_dict().items()}}
        assert 'blocks.0.gamma_1' in ckpt['model']
    torch.save(ckpt, tmp_path / 'ls.pth')
    dst = make_vit(seed=1, num_classes=0, init_values=0.1)
    info = load_pretrained(dst, str(tmp_path / 'ls.pth'))
    assert info['missing'] == [] and info['unexpected'] == []
    assert_loaded_like(dst, src)


class PromptedStandIn(VisionTransformer):
    """timm ViT plus a ``prompts.*`` parameter, like PromptedViT."""

    def __init__(self, **kwargs):
        super().__init__(img_size=32, patch_size=8, embed_dim=32,
                         depth=DEPTH, num_heads=2, num_classes=0, **kwargs)
        self.prompts = nn.ParameterDict(
            {'0': nn.Parameter(torch.zeros(3, 32))})


def test_own_layout_with_backbone_prefix_keeps_prompts(tmp_path):
    src = make_vit(seed=0, num_classes=0)
    prompt = torch.randn(3, 32)
    sd = {'backbone.' + k: v for k, v in src.state_dict().items()}
    sd['backbone.prompts.0'] = prompt
    sd['decode_head.conv_seg.weight'] = torch.randn(4, 32, 1, 1)
    torch.save({'meta': {}, 'state_dict': sd}, tmp_path / 'ours.pth')
    assert detect_layout(sd) == 'bpt_mm'

    dst = PromptedStandIn().eval()
    info = load_pretrained(dst, str(tmp_path / 'ours.pth'))
    assert info['layout'] == 'bpt_mm'
    assert info['dropped'] == ['decode_head.conv_seg.weight']
    assert info['new_prompt_keys'] == [] and info['missing'] == []
    assert torch.equal(dst.prompts['0'], prompt)
    assert_loaded_like(dst, src)


def test_prompt_keys_reported_apart_and_not_warned(tmp_path):
    src = make_vit(seed=0)
    torch.save(src.state_dict(), tmp_path / 'timm.pth')
    dst = PromptedStandIn()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        info = load_pretrained(dst, str(tmp_path / 'timm.pth'))
    assert info['new_prompt_keys'] == ['prompts.0']
    assert info['missing'] == []
    assert torch.equal(dst.prompts['0'], torch.zeros(3, 32))  # untouched


def test_missing_keys_reported_by_name(tmp_path, caplog):
    src = make_vit(seed=0)
    sd = {k: v for k, v in src.state_dict().items()
          if not k.startswith('norm.')}
    path = str(tmp_path / 'no_norm.pth')
    torch.save(sd, path)

    with pytest.warns(UserWarning, match=r'missing.*norm\.weight'):
        info = load_pretrained(make_vit(seed=1, num_classes=0), path)
    assert sorted(info['missing']) == ['norm.bias', 'norm.weight']

    logger = logging.getLogger('test_checkpoint')
    with caplog.at_level(logging.INFO, logger='test_checkpoint'):
        load_pretrained(make_vit(seed=1, num_classes=0), path, logger=logger)
    warned = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
    assert len(warned) == 1 and 'norm.bias' in warned[0]
    assert any('timm layout' in r.getMessage() for r in caplog.records
               if r.levelno == logging.INFO)


def test_unexpected_keys_refused_by_name(tmp_path):
    # A weight of the file's network the model cannot hold would be lost
    # and the features wrong: an error naming it, not a log line.
    sd = dict(make_vit(seed=0).state_dict())
    sd['blocks.0.attn.q_bias'] = torch.zeros(32)  # e.g. a BEiT-style extra
    torch.save(sd, tmp_path / 'extra.pth')
    dst = make_vit(seed=1, num_classes=0)
    before = dst.blocks[0].attn.qkv.weight.detach().clone()
    with pytest.raises(CheckpointError, match=r'blocks\.0\.attn\.q_bias'):
        load_pretrained(dst, str(tmp_path / 'extra.pth'))
    assert torch.equal(dst.blocks[0].attn.qkv.weight, before)  # untouched


# ------------------------------------------------------------ pos_embed
def test_pos_embed_resampled_to_model_grid_like_timm(tmp_path):
    src = make_vit(seed=0)  # 32 px / 8 -> 4x4 grid
    torch.save({'model': src.state_dict()}, tmp_path / 'deit.pth')
    dst = make_vit(seed=1, img_size=48, num_classes=0)  # 6x6 grid
    # timm's antialiased resampling when the model asks for it (plain
    # bicubic, MAE's and ViTDet's, is the default: tests/test_layouts.py).
    dst.pos_embed_antialias = True
    info = load_pretrained(dst, str(tmp_path / 'deit.pth'))
    assert info['pos_embed_resized'] == ((4, 4), (6, 6))
    expected = resample_abs_pos_embed(src.pos_embed.detach(), [6, 6],
                                      num_prefix_tokens=1)
    assert dst.pos_embed.shape == (1, 37, 32)
    assert torch.equal(dst.pos_embed, expected)
    assert torch.equal(dst.pos_embed[:, :1], src.pos_embed[:, :1])
    assert torch.equal(dst.blocks[1].mlp.fc2.weight,
                       src.blocks[1].mlp.fc2.weight)


def test_model_without_class_token_drops_its_position(tmp_path):
    src = make_vit(seed=0)
    torch.save(src.state_dict(), tmp_path / 'timm.pth')
    dst = make_vit(seed=1, num_classes=0, class_token=False,
                   global_pool='avg', fc_norm=False)
    info = load_pretrained(dst, str(tmp_path / 'timm.pth'))
    assert 'cls_token' in info['dropped'] and info['unexpected'] == []
    assert torch.equal(dst.pos_embed, src.pos_embed[:, 1:])


def test_resample_pos_embed_matches_timm_and_keeps_prefix():
    torch.manual_seed(0)
    pos = torch.randn(1, 2 + 16, 8)
    out = resample_pos_embed(pos, (3, 5), num_prefix_tokens=2,
                             antialias=True)
    assert out.shape == (1, 2 + 15, 8)
    assert torch.equal(out[:, :2], pos[:, :2])
    assert torch.equal(out, resample_abs_pos_embed(pos, [3, 5],
                                                   num_prefix_tokens=2))
    # Non-square source grids need old_grid.
    out = resample_pos_embed(pos, (4, 4), num_prefix_tokens=2,
                             old_grid=(2, 8), antialias=True)
    assert torch.equal(out, resample_abs_pos_embed(
        pos, [4, 4], old_size=[2, 8], num_prefix_tokens=2))
    assert resample_pos_embed(pos, (4, 4), num_prefix_tokens=2) is pos
    with pytest.raises(ValueError, match='old_grid'):
        resample_pos_embed(torch.randn(1, 1 + 12, 8), (4, 4))


# ----------------------------------------------------------- shape errors
def test_shape_mismatch_names_key_and_shapes(tmp_path):
    torch.save(make_vit(seed=0, embed_dim=48).state_dict(),
               tmp_path / 'wide.pth')
    with pytest.raises(CheckpointError) as err:
        load_pretrained(make_vit(seed=1, num_classes=0),
                        str(tmp_path / 'wide.pth'))
    msg = str(err.value)
    assert 'cls_token: checkpoint (1, 1, 48) vs model (1, 1, 32)' in msg
    assert 'wide.pth' in msg


def test_strict_shapes_false_skips_and_reports(tmp_path):
    src = make_vit(seed=0)
    sd = dict(src.state_dict())
    sd['norm.weight'] = torch.ones(48)
    torch.save(sd, tmp_path / 'bad_norm.pth')
    dst = make_vit(seed=1, num_classes=0)
    before = dst.norm.weight.detach().clone()
    with pytest.raises(CheckpointError,
                       match=r'norm\.weight.*\(48,\).*\(32,\)'):
        load_pretrained(dst, str(tmp_path / 'bad_norm.pth'))
    with pytest.warns(UserWarning, match='norm.weight'):
        info = load_pretrained(dst, str(tmp_path / 'bad_norm.pth'),
                               strict_shapes=False)
    assert info['mismatched'] == {'norm.weight': ((48,), (32,))}
    assert info['missing'] == []
    assert torch.equal(dst.norm.weight, before)
    assert torch.equal(dst.blocks[0].attn.qkv.weight,
                       src.blocks[0].attn.qkv.weight)


# ------------------------------------------------------------ bad files
def test_missing_file_is_file_not_found(tmp_path):
    path = str(tmp_path / 'nope.pth')
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        load_checkpoint_file(path)


def test_truncated_file_is_checkpoint_error_with_path(tmp_path):
    good = tmp_path / 'good.pth'
    torch.save(make_vit(seed=0).state_dict(), good)
    data = good.read_bytes()
    for fmt, blob in (('zip', data), ('legacy', None)):
        if blob is None:
            torch.save({'w': torch.randn(64, 64)}, good,
                       _use_new_zipfile_serialization=False)
            blob = good.read_bytes()
        bad = tmp_path / f'truncated_{fmt}.pth'
        bad.write_bytes(blob[:len(blob) // 2])
        with pytest.raises(CheckpointError, match=re.escape(str(bad))) as err:
            load_checkpoint_file(str(bad))
        # The legacy format is refused whole, before torch reads it.
        assert ('truncated, corrupt' if fmt == 'zip' else 'legacy') in \
            str(err.value)


@pytest.mark.parametrize('content', [b'model: vit_base\nlr: 0.1\n', b''])
def test_non_torch_file_is_checkpoint_error(tmp_path, content):
    path = tmp_path / 'config.pth'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_pretrained(make_vit(num_classes=0), str(path))


class RunsCode:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


@pytest.mark.parametrize('writer', ['torch.save', 'pickle.dump'])
def test_pickle_that_runs_code_is_refused(tmp_path, writer):
    marker = tmp_path / 'PWNED'
    path = tmp_path / 'evil.pth'
    # The code-running object comes first, so the refusal is about it and
    # not about how a raw pickle stores tensors.
    payload = {'x': RunsCode(marker),
               'state_dict': make_vit(seed=0).state_dict()}
    if writer == 'torch.save':
        torch.save(payload, path)
    else:  # protocol 2, which torch's weights-only unpickler parses
        with open(path, 'wb') as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(make_vit(num_classes=0), str(path))
    msg = str(err.value)
    assert 'refusing to execute code' in msg and str(path) in msg
    assert 'system' in msg  # the refused global is named
    assert not marker.exists()


def test_unknown_layout_lists_known_layouts(tmp_path):
    resnet = {'conv1.weight': torch.randn(8, 3, 3, 3),
              'bn1.running_mean': torch.zeros(8),
              'fc.weight': torch.randn(10, 8)}
    torch.save({'state_dict': resnet}, tmp_path / 'resnet.pth')
    with pytest.raises(CheckpointError) as err:
        load_pretrained(make_vit(num_classes=0), str(tmp_path / 'resnet.pth'))
    msg = str(err.value)
    assert all(repr(name) in msg for name in KNOWN_LAYOUTS)
    assert 'conv1.weight' in msg
    with pytest.raises(CheckpointError, match='known layouts'):
        convert_to_timm_layout(resnet, layout='swin')


# --------------------------------------------------------- pure helpers
def test_unwrap_state_dict_containers():
    t = torch.zeros(1)
    assert unwrap_state_dict({'pos_embed': t, 'epoch': 3}) == (
        {'pos_embed': t}, '')
    assert unwrap_state_dict({'model': {'module': {'a': t}},
                              'model_ema': {'b': t}}) == ({'a': t},
                                                          'model/module')
    assert unwrap_state_dict({'meta': {}, 'state_dict': {'a': t},
                              'model': {'b': t}})[1] == 'state_dict'
    with pytest.raises(CheckpointError, match='epoch'):
        unwrap_state_dict({'epoch': 3, 'optimizer': {}})


def test_convert_is_pure_and_strips_ddp_prefix():
    sd = {'module.' + k: v for k, v in make_vit(seed=0).state_dict().items()}
    keys = list(sd)
    out, dropped = convert_to_timm_layout(sd)
    assert list(sd) == keys  # input untouched
    assert dropped == ['module.head.bias', 'module.head.weight']
    assert 'blocks.1.attn.proj.weight' in out


def test_namespace_args_load_but_nothing_else_is_allowed(tmp_path):
    path = tmp_path / 'mae.pth'
    torch.save({'model': {'a': torch.ones(1)},
                'args': argparse.Namespace(lr=1.5e-4)}, path)
    ckpt = load_checkpoint_file(str(path))
    assert ckpt['args'].lr == 1.5e-4
