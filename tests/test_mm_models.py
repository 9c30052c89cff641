"""PromptedViT inside mmdet and mmseg models, built through their
registries."""
import os.path as osp
import subprocess
import sys

import torch
from mmengine.config import Config

import bpt_mm  # noqa: F401  registers the modules
from bpt_mm.models import PromptedViT, SimpleFeaturePyramid

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SMALL = dict(embed_dims=32, num_layers=4, num_heads=2, mlp_ratio=2.0)


def _check_grads(model):
    """Prompts, neck and heads get gradients; frozen backbone weights none."""
    for name, param in model.named_parameters():
        if name.startswith('backbone.') and '.prompts.' not in name:
            assert not param.requires_grad and param.grad is None, name
    prompt_grads = [p.grad for n, p in model.named_parameters()
                    if '.prompts.' in n and p.requires_grad]
    assert prompt_grads and all(g is not None and g.abs().sum() > 0
                                for g in prompt_grads)


def test_built_by_each_registry_from_a_config_dict():
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS
    cfg = dict(type='PromptedViT', arch=SMALL, img_size=32, patch_size=8,
               prompt=dict(type='VPTPrompt', num_tokens=2))
    for registry in (MMDET_MODELS, MMSEG_MODELS):
        for type_name in ('PromptedViT', 'bpt_mm.PromptedViT'):
            model = registry.build(dict(cfg, type=type_name))
            assert isinstance(model, PromptedViT)
    neck = MMDET_MODELS.build(dict(type='SimpleFeaturePyramid',
                                   in_channels=32, out_channels=8))
    assert isinstance(neck, SimpleFeaturePyramid)


def test_scoped_type_needs_no_custom_imports():
    # A fresh interpreter that never imports bpt_mm itself: mmengine finds
    # the `bpt_mm` scope and imports its locations on demand.
    code = (
        'import sys\n'
        'from mmdet.registry import MODELS\n'
        "m = MODELS.build(dict(type='bpt_mm.PromptedViT', arch=dict("
        'embed_dims=32, num_layers=2, num_heads=2), img_size=32, '
        "patch_size=8, prompt=dict(type='bpt_mm.BilinearPrompt', "
        'num_tokens=2, rank=2)))\n'
        "print(type(m).__module__, 'bpt_mm' in sys.modules)\n")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ['bpt_mm.models.vit', 'True']


def test_simple_feature_pyramid_strides_and_channels():
    neck = SimpleFeaturePyramid(in_channels=32, out_channels=16)
    outs = neck((torch.rand(2, 32, 6, 8), ))
    assert [tuple(o.shape[-2:]) for o in outs] == [(24, 32), (12, 16), (6, 8),
                                                   (3, 4), (2, 2)]
    assert all(o.shape[:2] == (2, 16) for o in outs)


def test_mask_rcnn_forward_backward_one_step():
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(
        osp.join(ROOT, 'configs', 'tiny', 'mask_rcnn_bpt_tiny.py'))
    cfg.model.backbone.prompt.whitening_init = False  # no hook here
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    packed = demo_mm_inputs(2, [[3, 128, 160], [3, 96, 128]], num_items=[2, 1],
                            num_classes=3, with_mask=True)
    data = model.data_preprocessor(packed, True)
    losses = model(**data, mode='loss')
    assert {'loss_rpn_cls', 'loss_cls', 'loss_bbox', 'loss_mask'} <= \
        set(losses)
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    loss.backward()
    _check_grads(model)
    model.eval()
    with torch.no_grad():
        preds = model(**model.data_preprocessor(packed, False),
                      mode='predict')
    assert len(preds) == 2 and hasattr(preds[0], 'pred_instances')


def test_upernet_forward_backward_one_step(tmp_path):
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules
    from mmengine.structures import PixelData
    register_all_modules()
    cfg_file = tmp_path / 'upernet.py'
    cfg_file.write_text(
        "_base_ = 'mmseg::_base_/models/upernet_vit-b16_ln_mln.py'\n")
    cfg = Config.fromfile(str(cfg_file))
    model_cfg = cfg.model
    model_cfg.pretrained = None  # the base names a file we do not have
    norm = dict(type='BN', requires_grad=True)
    model_cfg.backbone = dict(
        type='PromptedViT', arch=SMALL, img_size=64, patch_size=16,
        out_indices=(0, 1, 2, 3),
        prompt=dict(type='WhitenedPrompt', num_tokens=4, tunable=True,
                    depth='deep', allow_identity_whitening=True))
    model_cfg.neck = dict(type='MultiLevelNeck', in_channels=[32] * 4,
                          out_channels=32, scales=[4, 2, 1, 0.5])
    model_cfg.decode_head.update(in_channels=[32] * 4, channels=32,
                                 num_classes=150, norm_cfg=norm)
    model_cfg.auxiliary_head.update(in_channels=32, channels=16,
                                    num_classes=150, norm_cfg=norm)
    model_cfg.data_preprocessor.size = (64, 64)
    model = MODELS.build(model_cfg)
    model.init_weights()
    model.train()
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(64, 64),
                                             pad_shape=(64, 64),
                                             ori_shape=(64, 64)))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, 150, (1, 64, 64)))
        samples.append(sample)
    inputs = torch.rand(2, 3, 64, 64)
    losses = model(inputs, samples, mode='loss')
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    loss.backward()
    _check_grads(model)
    # tWhiten W trains in the top blocks only
    w_grads = {n: p.grad for n, p in model.named_parameters()
               if n.endswith('.whitening')}
    assert sorted(w_grads) == [f'backbone.prompts.{i}.whitening'
                               for i in range(4)]


def test_pyramid_layer_norm_eps_as_mmdet_vitdet_builds_it():
    # mmdet's ViTDet pyramid builds its LN2d through mmcv's
    # build_norm_layer, which sets eps=1e-5 when the config gives none.
    import pytest
    from mmcv.cnn import build_norm_layer

    from bpt_mm.models import LayerNorm2d
    _, built = build_norm_layer(dict(type='LN2d'), 16)
    norms = [m.norm for m in SimpleFeaturePyramid(
        in_channels=32, out_channels=16).modules()
        if isinstance(m, LayerNorm2d)]
    assert norms and all(n.eps == built.norm.eps == 1e-5 for n in norms)
    custom = SimpleFeaturePyramid(in_channels=32, out_channels=16,
                                  norm_eps=1e-6)
    assert all(m.norm.eps == 1e-6 for m in custom.modules()
               if isinstance(m, LayerNorm2d))
    with pytest.raises(ValueError, match='`norm_eps`'):
        SimpleFeaturePyramid(in_channels=32, norm_eps=0)
