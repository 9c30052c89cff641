"""LayerDecayOptimWrapperConstructor: lr scales, decay groups, frozen."""
import pytest
import torch
import torch.nn as nn
from mmengine.optim import build_optim_wrapper

import bpt_mm  # noqa: F401  registers the constructor
from bpt_mm.engine import LayerDecayOptimWrapperConstructor
from helpers import small_vit

NUM_LAYERS = 3
ARCH = dict(embed_dims=16, num_layers=NUM_LAYERS, num_heads=2, mlp_ratio=1.0)
BASE_LR = 1.0
BASE_WD = 0.1


class Detector(nn.Module):
    """The shape of an mmdet/mmseg model: backbone, neck, head."""

    def __init__(self, **backbone_kwargs) -> None:
        super().__init__()
        backbone_kwargs.setdefault('frozen', False)
        self.backbone = small_vit(arch=ARCH, patch_size=16,
                                  **backbone_kwargs)
        self.neck = nn.Conv2d(16, 8, 1)
        self.head = nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4))


def constructor(rate: float, wd=BASE_WD) -> LayerDecayOptimWrapperConstructor:
    optimizer = dict(type='AdamW', lr=BASE_LR)
    if wd is not None:
        optimizer['weight_decay'] = wd
    return LayerDecayOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=optimizer),
        dict(layer_decay_rate=rate))


def settings_by_name(model: nn.Module, rate: float, wd=BASE_WD):
    """{param name: (lr, weight_decay)} of the optimizer built for model."""
    groups = constructor(rate, wd)(model).optimizer.param_groups
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in groups:
        for param in group['params']:
            name = by_id[id(param)]
            assert name not in out, f'{name} is in two groups'
            out[name] = (group['lr'], group['weight_decay'])
    return out


def expected_depth(name: str) -> int:
    """The depth rule written out independently of get_layer_depth."""
    if name.startswith(('backbone.patch_embed', 'backbone.cls_token',
                        'backbone.pos_embed')):
        return 0
    for prefix in ('backbone.blocks.', 'backbone.prompts.'):
        if name.startswith(prefix):
            return int(name[len(prefix):].split('.')[0]) + 1
    return NUM_LAYERS + 1  # final norm, neck, head


def test_exact_lr_scales_full_finetuning():
    model = Detector()
    rate = 0.5
    got = settings_by_name(model, rate)
    assert set(got) == {n for n, _ in model.named_parameters()}
    for name, (lr, _) in got.items():
        scale = rate**(NUM_LAYERS + 1 - expected_depth(name))
        assert lr == pytest.approx(BASE_LR * scale), name
    # spot checks of the rule: 4 decays below the heads for the embedding
    assert got['backbone.patch_embed.proj.weight'][0] == pytest.approx(
        0.0625)
    assert got['backbone.blocks.0.attn.qkv.weight'][0] == pytest.approx(
        0.125)
    assert got[f'backbone.blocks.{NUM_LAYERS - 1}.mlp.fc1.weight'][0] == \
        pytest.approx(0.5)
    assert got['backbone.norm.weight'][0] == pytest.approx(1.0)
    assert got['head.0.weight'][0] == pytest.approx(1.0)


def test_decay_and_no_decay_groups():
    model = Detector()
    got = settings_by_name(model, 0.7)
    no_decay = {n for n, (_, wd) in got.items() if wd == 0}
    decay = {n for n, (_, wd) in got.items() if wd == BASE_WD}
    assert no_decay | decay == set(got)
    for name, param in model.named_parameters():
        exempt = (param.ndim == 1 or name.endswith(('pos_embed',
                                                     'cls_token')))
        assert (name in no_decay) == exempt, name
    # the names the convention is about, explicitly
    for name in ('backbone.pos_embed', 'backbone.cls_token',
                 'backbone.blocks.1.norm1.weight',
                 'backbone.blocks.1.attn.qkv.bias', 'neck.bias',
                 'head.1.weight', 'head.1.bias'):
        assert name in no_decay, name
    for name in ('backbone.patch_embed.proj.weight',
                 'backbone.blocks.1.attn.qkv.weight',
                 'backbone.blocks.2.mlp.fc2.weight', 'neck.weight',
                 'head.0.weight'):
        assert name in decay, name


def test_groups_are_merged_by_depth_and_decay():
    model = Detector()
    groups = constructor(0.7)(model).optimizer.param_groups
    keys = [(g['lr'], g['weight_decay']) for g in groups]
    assert len(keys) == len(set(keys))
    # depths 0 .. L+1, each with decay and no-decay tensors
    assert len(groups) == 2 * (NUM_LAYERS + 2)
    assert [g['lr'] for g in groups] == sorted(g['lr'] for g in groups)


def test_frozen_params_absent_and_prompts_not_decayed():
    model = Detector(frozen=True, prompt=dict(
        type='BilinearPrompt', num_tokens=4, rank=3, depth='deep'))
    rate = 0.5
    got = settings_by_name(model, rate)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == trainable
    assert all(n.startswith('backbone.prompts.')
               or not n.startswith('backbone.') for n in got)
    prompt_names = [n for n in got if n.startswith('backbone.prompts.')]
    # A at all blocks, B (a 2-D parameter) at the top ones: none decayed
    assert any(n.endswith('.basis') for n in prompt_names)
    for name in prompt_names:
        lr, wd = got[name]
        assert wd == 0, name
        assert lr == pytest.approx(
            rate**(NUM_LAYERS + 1 - expected_depth(name))), name
    # the neck and heads are still decayed
    assert got['neck.weight'][1] == BASE_WD


def test_rate_one_keeps_the_base_lr_everywhere():
    got = settings_by_name(Detector(), 1.0)
    assert {lr for lr, _ in got.values()} == {BASE_LR}


def test_no_base_weight_decay_still_exempts():
    got = settings_by_name(Detector(), 0.7, wd=None)
    assert got['backbone.pos_embed'][1] == 0
    # the decayed ones keep the optimizer's own default (AdamW: 0.01)
    assert got['neck.weight'][1] == pytest.approx(0.01)


def test_ddp_style_wrapper_is_unwrapped():
    model = Detector()
    groups = []
    constructor(0.7).add_params(groups, nn.DataParallel(model))
    assert sum(len(g['params']) for g in groups) == len(
        list(model.parameters()))


def test_built_from_a_config_through_the_registry():
    model = Detector()
    for type_name in ('LayerDecayOptimWrapperConstructor',
                      'bpt_mm.LayerDecayOptimWrapperConstructor'):
        wrapper = build_optim_wrapper(model, dict(
            type='OptimWrapper', constructor=type_name,
            optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.1),
            paramwise_cfg=dict(layer_decay_rate=0.7)))
        lrs = {g['lr'] for g in wrapper.optimizer.param_groups}
        assert max(lrs) == pytest.approx(1e-4)
        assert min(lrs) == pytest.approx(1e-4 * 0.7**(NUM_LAYERS + 1))


@pytest.mark.parametrize('rate', [0, 0.0, -0.5, 1.01, 7, True, '0.7', None,
                                  float('nan')])
def test_bad_rate_refused(rate):
    with pytest.raises(ValueError, match=r'paramwise_cfg\.layer_decay_rate'
                       r'.*\(0, 1\]'):
        constructor(rate)


def test_missing_and_unknown_paramwise_keys_refused():
    optim = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4))
    with pytest.raises(ValueError, match=r'paramwise_cfg\.layer_decay_rate'):
        LayerDecayOptimWrapperConstructor(optim, None)
    with pytest.raises(ValueError, match=r'paramwise_cfg\.decay_rate.*'
                       r'allowed.*paramwise_cfg\.layer_decay_rate'):
        LayerDecayOptimWrapperConstructor(optim, dict(decay_rate=0.7))
    with pytest.raises(ValueError, match=r'optimizer\.lr'):
        LayerDecayOptimWrapperConstructor(
            dict(optimizer=dict(type='SGD')), dict(layer_decay_rate=0.7))


def test_model_without_layer_depths_refused():
    plain = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match='get_layer_depth'):
        constructor(0.7)(plain)
    with_backbone = nn.Module()
    with_backbone.backbone = nn.Linear(2, 2)
    with pytest.raises(ValueError, match='get_layer_depth.*Linear'):
        constructor(0.7)(with_backbone)


def test_nothing_trainable_refused():
    model = Detector(frozen=True)
    for param in model.parameters():
        param.requires_grad_(False)
    with pytest.raises(ValueError, match='requires_grad=True'):
        constructor(0.7)(model)


def test_one_optimizer_step_moves_only_trainable_params():
    torch.manual_seed(0)
    model = Detector(frozen=True, prompt=dict(type='VPTPrompt',
                                              num_tokens=2))
    wrapper = constructor(0.7)(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    feats = model.backbone(torch.rand(2, 3, 32, 32))[-1]
    loss = model.head(model.neck(feats).mean((2, 3))).pow(2).sum()
    wrapper.update_params(loss)
    for name, param in model.named_parameters():
        moved = not torch.equal(before[name], param)
        assert moved == param.requires_grad, name


def test_docstring_example():
    import doctest

    from bpt_mm.engine import optim
    result = doctest.testmod(optim, verbose=False)
    assert result.attempted > 0 and result.failed == 0
