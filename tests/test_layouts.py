"""Real checkpoint layouts load exactly or are refused with the option named.

Each test writes a state dict with the key names and shapes its codebase
uses and compares PromptedViT's features after loading with an independent
forward: mmseg's own ``VisionTransformer`` (installed), or a few lines of
the reference forward written here (mmpretrain's ``VisionTransformer`` with
``pre_norm=True``; layer scale as mmpretrain and DeiT III compute it).
"""
import re

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from bpt_mm.models import PromptedViT
from bpt_mm.models.checkpoint import CheckpointError, resample_pos_embed
from helpers import small_vit

DIM, DEPTH, HEADS, PATCH, IMG = 32, 2, 2, 8, 32
ARCH = dict(embed_dims=DIM, num_layers=DEPTH, num_heads=HEADS, mlp_ratio=4.0)


def prompted_vit(path, **kwargs) -> PromptedViT:
    kwargs.setdefault('out_indices', tuple(range(DEPTH)))
    model = small_vit(arch=ARCH, img_size=IMG, patch_size=PATCH,
                      init_cfg=dict(type='Pretrained', checkpoint=str(path)),
                      **kwargs)
    model.init_weights()
    return model.eval()


def random_state(seed: int, patch_bias: bool, pre_norm: bool,
                 layer_scale: bool) -> dict:
    """Random weights of a ViT in timm's names (converted below)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2, offset=0.0):
        return torch.randn(*shape, generator=gen) * scale + offset

    sd = {'cls_token': rand(1, 1, DIM), 'pos_embed': rand(1, 17, DIM),
          'patch_embed.proj.weight': rand(DIM, 3, PATCH, PATCH, scale=0.05),
          'norm.weight': rand(DIM, offset=1.0), 'norm.bias': rand(DIM)}
    if patch_bias:
        sd['patch_embed.proj.bias'] = rand(DIM)
    if pre_norm:
        sd['norm_pre.weight'] = rand(DIM, offset=1.0)
        sd['norm_pre.bias'] = rand(DIM)
    for i in range(DEPTH):
        b = f'blocks.{i}.'
        sd.update({
            b + 'norm1.weight': rand(DIM, offset=1.0),
            b + 'norm1.bias': rand(DIM),
            b + 'attn.qkv.weight': rand(3 * DIM, DIM),
            b + 'attn.qkv.bias': rand(3 * DIM),
            b + 'attn.proj.weight': rand(DIM, DIM),
            b + 'attn.proj.bias': rand(DIM),
            b + 'norm2.weight': rand(DIM, offset=1.0),
            b + 'norm2.bias': rand(DIM),
            b + 'mlp.fc1.weight': rand(4 * DIM, DIM),
            b + 'mlp.fc1.bias': rand(4 * DIM),
            b + 'mlp.fc2.weight': rand(DIM, 4 * DIM),
            b + 'mlp.fc2.bias': rand(DIM),
        })
        if layer_scale:
            sd[b + 'ls1.gamma'] = rand(DIM, scale=0.5)
            sd[b + 'ls2.gamma'] = rand(DIM, scale=0.5)
    return sd


def reference_features(sd: dict, x: torch.Tensor, eps: float = 1e-6,
                       final_norm: bool = False) -> list:
    """The reference ViT forward, written from the formulas: conv patch
    embedding, class token, position embedding (plain bicubic when the grid
    differs, as mmpretrain/mmseg/MAE), optional pre-norm, pre-norm blocks
    with optional layer scale, optional final norm. Returns the patch maps
    of every block."""
    def ln(t, prefix):
        return F.layer_norm(t, (DIM, ), sd[prefix + 'weight'],
                            sd[prefix + 'bias'], eps)

    t = F.conv2d(x, sd['patch_embed.proj.weight'],
                 sd.get('patch_embed.proj.bias'), stride=PATCH)
    B, _, h, w = t.shape
    t = t.flatten(2).transpose(1, 2)
    pos = sd['pos_embed']
    if (h, w) != (4, 4):
        grid = pos[:, 1:].reshape(1, 4, 4, DIM).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode='bicubic',
                             align_corners=False)
        pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)
    t = torch.cat([sd['cls_token'].expand(B, -1, -1), t], 1) + pos
    if 'norm_pre.weight' in sd:
        t = ln(t, 'norm_pre.')
    outs = []
    for i in range(DEPTH):
        b = f'blocks.{i}.'
        y = ln(t, b + 'norm1.')
        q, k, v = F.linear(y, sd[b + 'attn.qkv.weight'],
                           sd[b + 'attn.qkv.bias']).chunk(3, dim=-1)
        heads = [z.reshape(B, -1, HEADS, DIM // HEADS).transpose(1, 2)
                 for z in (q, k, v)]
        att = (heads[0] @ heads[1].transpose(-2, -1)) * (DIM // HEADS)**-0.5
        y = (att.softmax(-1) @ heads[2]).transpose(1, 2).reshape(B, -1, DIM)
        y = F.linear(y, sd[b + 'attn.proj.weight'], sd[b + 'attn.proj.bias'])
        t = t + y * sd.get(b + 'ls1.gamma', 1.0)
        y = F.gelu(F.linear(ln(t, b + 'norm2.'), sd[b + 'mlp.fc1.weight'],
                            sd[b + 'mlp.fc1.bias']))
        y = F.linear(y, sd[b + 'mlp.fc2.weight'], sd[b + 'mlp.fc2.bias'])
        t = t + y * sd.get(b + 'ls2.gamma', 1.0)
        out = ln(t, 'norm.') if final_norm and i == DEPTH - 1 else t
        outs.append(out[:, 1:].transpose(1, 2).reshape(B, DIM, h, w))
    return outs


def assert_features_equal(model, reference, x):
    with torch.no_grad():
        got = model(x)
    assert len(got) == len(reference)
    for a, b in zip(got, reference):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# mmpretrain's VisionTransformer names (mmpretrain/models/backbones/
# vision_transformer.py: PatchEmbed.projection, pre_norm, layers.{i}.ln1,
# attn.qkv/proj, attn.gamma1 (LayerScale.weight), ln2, ffn.layers.0.0 /
# ffn.layers.1, ffn.gamma2, final ln1), under the classifier's 'backbone.'.
_MMPRETRAIN_NAMES = (
    (r'^blocks\.(\d+)\.norm1\.', r'layers.\1.ln1.'),
    (r'^blocks\.(\d+)\.norm2\.', r'layers.\1.ln2.'),
    (r'^blocks\.(\d+)\.mlp\.fc1\.', r'layers.\1.ffn.layers.0.0.'),
    (r'^blocks\.(\d+)\.mlp\.fc2\.', r'layers.\1.ffn.layers.1.'),
    (r'^blocks\.(\d+)\.ls1\.gamma$', r'layers.\1.attn.gamma1.weight'),
    (r'^blocks\.(\d+)\.ls2\.gamma$', r'layers.\1.ffn.gamma2.weight'),
    (r'^blocks\.(\d+)\.attn\.', r'layers.\1.attn.'),
    (r'^patch_embed\.proj\.', r'patch_embed.projection.'),
    (r'^norm_pre\.', r'pre_norm.'),
    (r'^norm\.', r'ln1.'),
)


def mmpretrain_checkpoint(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        for pattern, repl in _MMPRETRAIN_NAMES:
            new, hits = re.subn(pattern, repl, key)
            if hits:
                key = new
                break
        out['backbone.' + key] = value
    out['head.layers.head.weight'] = torch.zeros(10, DIM)  # a classifier
    return {'meta': {}, 'state_dict': out}


# ------------------------------------------------------------ mmseg layout
def mmseg_vit(patch_bias: bool, pre_norm: bool):
    from mmseg.models.backbones import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=IMG, patch_size=PATCH, embed_dims=DIM, num_layers=DEPTH,
        num_heads=HEADS, mlp_ratio=4, out_indices=tuple(range(DEPTH)),
        qkv_bias=True, norm_cfg=dict(type='LN', eps=1e-6),
        patch_bias=patch_bias, pre_norm=pre_norm, final_norm=False)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.eval()  # mmseg's train() returns None, so not chained
    return model


@pytest.mark.parametrize('pre_norm', [False, True])
def test_mmseg_vit_without_patch_bias_loads_exactly(tmp_path, pre_norm,
                                                    one_thread):
    ref = mmseg_vit(patch_bias=False, pre_norm=pre_norm)
    assert ref.patch_embed.projection.bias is None
    path = tmp_path / 'mmseg_vit.pth'
    # A segmentor's checkpoint: the backbone under 'backbone.', and a head.
    sd = {'backbone.' + k: v for k, v in ref.state_dict().items()}
    sd['decode_head.conv_seg.weight'] = torch.zeros(4, DIM, 1, 1)
    torch.save({'meta': {}, 'state_dict': sd}, path)

    model = prompted_vit(path, patch_bias=False, pre_norm=pre_norm)
    # the pretraining grid and another one (position embedding resampled
    # by plain bicubic, as mmseg's resize_pos_embed)
    for size in ((32, 32), (40, 56)):
        x = torch.rand(2, 3, *size)
        with torch.no_grad():
            expected = ref(x)
        assert_features_equal(model, expected, x)

    with pytest.raises(CheckpointError, match=r'`patch_bias` to False'):
        prompted_vit(path, patch_bias=True, pre_norm=pre_norm)
    if pre_norm:
        with pytest.raises(CheckpointError, match=r'`pre_norm` to True'):
            prompted_vit(path, patch_bias=False)


# ------------------------------------------------------- mmpretrain layout
def test_mmpretrain_pre_norm_layout_loads_exactly_or_is_refused(
        tmp_path, one_thread):
    # mmpretrain: pre_norm=True builds the patch conv without bias.
    sd = random_state(1, patch_bias=False, pre_norm=True, layer_scale=False)
    path = tmp_path / 'mmpretrain_clip_style.pth'
    torch.save(mmpretrain_checkpoint(sd), path)

    model = prompted_vit(path, patch_bias=False, pre_norm=True,
                         final_norm=True)
    for size in ((32, 32), (48, 40)):
        x = torch.rand(2, 3, *size)
        assert_features_equal(model, reference_features(
            sd, x, final_norm=True), x)

    with pytest.raises(CheckpointError) as err:
        prompted_vit(path)  # timm defaults: patch bias, no pre-norm
    message = str(err.value)
    assert '`pre_norm` to True' in message
    assert '`patch_bias` to False' in message
    assert 'norm_pre.weight' in message and 'patch_embed.proj.bias' in message


@pytest.mark.parametrize('source', ['mmpretrain', 'deit3'])
def test_layer_scale_layouts_load_exactly_or_are_refused(tmp_path, source,
                                                         one_thread):
    sd = random_state(2, patch_bias=True, pre_norm=False, layer_scale=True)
    if source == 'mmpretrain':
        ckpt = mmpretrain_checkpoint(sd)
        assert 'backbone.layers.1.ffn.gamma2.weight' in ckpt['state_dict']
    else:  # DeiT III's names (gamma_1 / gamma_2, a head) on a pos_embed
        # with a class position; the real release has none, see
        # test_deit3_layout_loads_exactly_with_no_embed_class
        ckpt = {'model': {re.sub(r'ls([12])\.gamma$', r'gamma_\1', k): v
                          for k, v in sd.items()}}
        ckpt['model']['head.weight'] = torch.zeros(10, DIM)
        assert 'blocks.0.gamma_1' in ckpt['model']
    path = tmp_path / f'{source}_layer_scale.pth'
    torch.save(ckpt, path)

    model = prompted_vit(path, layer_scale_init_value=1e-5)
    torch.testing.assert_close(model.blocks[1].ls2.gamma,
                               sd['blocks.1.ls2.gamma'], rtol=0, atol=0)
    x = torch.rand(2, 3, 32, 32)
    assert_features_equal(model, reference_features(sd, x), x)

    with pytest.raises(CheckpointError,
                       match=r'ls1\.gamma.*`layer_scale_init_value`'):
        prompted_vit(path)
    # and the other way round: a model with layer scale, a file without
    plain = random_state(3, patch_bias=True, pre_norm=False,
                         layer_scale=False)
    torch.save(plain, tmp_path / 'plain.pth')
    with pytest.raises(CheckpointError,
                       match=r'`layer_scale_init_value` to None'):
        prompted_vit(tmp_path / 'plain.pth', layer_scale_init_value=0.1)


def test_backbone_weights_without_a_place_are_refused(tmp_path):
    sd = random_state(4, patch_bias=True, pre_norm=False, layer_scale=False)
    sd['blocks.0.attn.q_norm.weight'] = torch.ones(DIM // HEADS)
    sd['head.weight'] = torch.zeros(10, DIM)  # irrelevant: dropped by name
    torch.save(sd, tmp_path / 'qk_norm.pth')
    with pytest.raises(CheckpointError) as err:
        prompted_vit(tmp_path / 'qk_norm.pth')
    assert 'blocks.0.attn.q_norm.weight' in str(err.value)
    assert 'head.weight' not in str(err.value)


# ------------------------------------------------- position embeddings
def test_default_resampling_is_mae_and_vitdet_plain_bicubic():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 14 * 14, 16)
    # MAE's interpolate_pos_embed / ViTDet's get_abs_pos, as their code
    # writes it: bicubic, align_corners=False, no antialiasing.
    grid = pos[:, 1:].reshape(1, 14, 14, 16).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(64, 64), mode='bicubic',
                         align_corners=False)
    mae = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(
        1, -1, 16)], dim=1)
    got = resample_pos_embed(pos, (64, 64))
    torch.testing.assert_close(got, mae, rtol=0, atol=1e-6)
    # timm's antialiased kernel is another formula, kept as an option.
    timm = resample_abs_pos_embed(pos, [64, 64], num_prefix_tokens=1)
    assert torch.equal(resample_pos_embed(pos, (64, 64), antialias=True),
                       timm)
    relative = (timm - mae).norm() / mae.norm()
    assert relative > 1e-3

    # PromptedViT resamples the same way at run time, and at load.
    model = small_vit(arch=ARCH, img_size=14 * PATCH, patch_size=PATCH)
    with torch.no_grad():
        model.pos_embed.copy_(pos[..., :1].expand(-1, -1, DIM))
        expected = resample_pos_embed(model.pos_embed, (9, 11))
        assert torch.equal(model._resampled_pos_embed(9, 11), expected)
        model.pos_embed_antialias = True
        assert torch.equal(model._resampled_pos_embed(9, 11),
                           resample_abs_pos_embed(model.pos_embed, [9, 11],
                                                  num_prefix_tokens=1))


def test_load_resamples_plain_bicubic_unless_antialias_asked(tmp_path):
    sd = random_state(5, patch_bias=True, pre_norm=False, layer_scale=False)
    torch.save(sd, tmp_path / 'timm.pth')
    for antialias in (False, True):
        model = small_vit(arch=ARCH, img_size=48, patch_size=PATCH,
                          pos_embed_antialias=antialias,
                          init_cfg=dict(type='Pretrained',
                                        checkpoint=str(tmp_path /
                                                       'timm.pth')))
        model.init_weights()
        expected = resample_pos_embed(sd['pos_embed'], (6, 6),
                                      antialias=antialias)
        assert torch.equal(model.pos_embed.detach(), expected)


def test_pre_norm_is_stem_frozen_and_prompts_enter_after_it():
    model = small_vit(dict(type='VPTPrompt', num_tokens=3), arch=ARCH,
                      img_size=IMG, patch_size=PATCH, pre_norm=True,
                      patch_bias=False)
    assert model.get_layer_depth('backbone.norm_pre.weight',
                                 'backbone.') == (0, DEPTH + 2)
    assert not model.norm_pre.weight.requires_grad
    assert model.patch_embed.proj.bias is None
    with torch.no_grad():
        model.norm_pre.weight.mul_(3.0)  # not the identity LayerNorm
        x = torch.rand(1, 3, IMG, IMG)
        _, tokens, _, _ = next(model.eval().iter_blocks(x))
        # [CLS, prompts, patches]: the prompts are not normalised ...
        torch.testing.assert_close(tokens[0, 1:4], model.prompt_tokens(0))
        # ... the class and patch tokens are.
        embedded, _ = model._embed(x)
        expected = model.norm_pre(torch.cat([
            model.cls_token, model.patch_embed(x).flatten(2).transpose(
                1, 2)], 1) + model.pos_embed)
        torch.testing.assert_close(embedded, expected)


# ------------------------------------------------- weights the file lacks
def test_used_weights_missing_from_the_file_are_refused(tmp_path, one_thread):
    """A checkpoint shallower than the model, or without the final norm a
    ``final_norm=True`` model applies, would leave random (frozen) weights
    in a backbone that reads as loaded: refused, naming keys and option."""
    sd = random_state(0, patch_bias=True, pre_norm=False, layer_scale=False)
    path = tmp_path / 'depth2.pth'
    torch.save(sd, path)
    deeper = dict(ARCH, num_layers=DEPTH + 1)
    with pytest.raises(CheckpointError,
                       match=r'blocks\.2\.attn\.qkv\.weight.*block\(s\) '
                       r'\[2\].*num_layers=3'):
        small_vit(arch=deeper, img_size=IMG, patch_size=PATCH,
                  init_cfg=dict(type='Pretrained',
                                checkpoint=str(path))).init_weights()

    no_norm = {k: v for k, v in sd.items() if not k.startswith('norm.')}
    path = tmp_path / 'no_norm.pth'
    torch.save(no_norm, path)
    with pytest.raises(CheckpointError,
                       match=r'norm\.weight.*`final_norm=False`'):
        prompted_vit(path, final_norm=True)
    # Without final_norm the norm is never used: the file loads exactly.
    model = prompted_vit(path, final_norm=False)
    x = torch.rand(2, 3, IMG, IMG)
    assert_features_equal(model, reference_features(sd, x), x)


def test_register_tokens_are_refused_by_name(tmp_path, one_thread):
    """timm's ``reg_tokens`` add a ``reg_token`` and lengthen ``pos_embed``;
    the refusal names the register tokens, not the position-embedding
    shape they change (which was checked first and said 'not square')."""
    sd = random_state(0, patch_bias=True, pre_norm=False, layer_scale=False)
    sd['reg_token'] = torch.zeros(1, 4, DIM)
    sd['pos_embed'] = torch.cat([sd['pos_embed'], torch.zeros(1, 4, DIM)], 1)
    path = tmp_path / 'reg.pth'
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r'no place for: reg_token'):
        prompted_vit(path)


# ------------------------------------------------------------ DeiT III
def deit3_timm(**kwargs):
    """timm's DeiT III model (``no_embed_class=True``, layer scale), with
    non-trivial weights: its ``pos_embed`` covers the 4x4 grid only."""
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(5)
    model = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM,
                              depth=DEPTH, num_heads=HEADS, num_classes=10,
                              no_embed_class=True, init_values=1e-6,
                              **kwargs)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def test_deit3_layout_loads_exactly_with_no_embed_class(tmp_path,
                                                        one_thread):
    """DeiT III's release (``model``: timm names, ``gamma_1``/``gamma_2``,
    a ``pos_embed`` without a class position) loads exactly with
    ``no_embed_class=True``; without it, or a classic file with it, the
    load is refused naming the option."""
    ref = deit3_timm()
    sd = {re.sub(r'ls([12])\.gamma$', r'gamma_\1', k): v
          for k, v in ref.state_dict().items()}
    assert sd['pos_embed'].shape == (1, 16, DIM) and 'blocks.0.gamma_1' in sd
    path = tmp_path / 'deit3.pth'
    torch.save({'model': sd}, path)

    model = prompted_vit(path, no_embed_class=True, final_norm=True,
                         layer_scale_init_value=1e-6, out_indices=-1)
    x = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        tokens = ref.forward_features(x)[:, 1:]
    expected = tokens.transpose(1, 2).reshape(2, DIM, 4, 4)
    assert_features_equal(model, [expected], x)
    # another input size: timm resamples (antialiased) as
    # pos_embed_antialias=True does, over the grid positions only
    dynamic = deit3_timm(dynamic_img_size=True)
    model = prompted_vit(path, no_embed_class=True, final_norm=True,
                         layer_scale_init_value=1e-6, out_indices=-1,
                         pos_embed_antialias=True)
    x = torch.rand(2, 3, 48, 40)
    with torch.no_grad():
        tokens = dynamic.forward_features(x)[:, 1:]
    assert_features_equal(model, [tokens.transpose(1, 2).reshape(
        2, DIM, 6, 5)], x)

    with pytest.raises(CheckpointError,
                       match=r'no position for the model.s class token.*'
                       r'`no_embed_class` to True'):
        prompted_vit(path, layer_scale_init_value=1e-6)
    classic = random_state(6, patch_bias=True, pre_norm=False,
                           layer_scale=False)
    torch.save(classic, tmp_path / 'classic.pth')
    with pytest.raises(CheckpointError,
                       match=r'position for the class token.*'
                       r'`no_embed_class` to False'):
        prompted_vit(tmp_path / 'classic.pth', no_embed_class=True)
