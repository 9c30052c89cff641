"""Tests of PromptedViT: equivalence with timm, prompts, freezing, errors."""
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from bpt_mm.models import PromptedViT, WhiteningNotReadyError
from bpt_mm.models.attention import prompted_block_forward
from bpt_mm.utils import trainable_parameters
from helpers import DEVICES, small_vit


def n_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- timm parity
def test_plain_vit_matches_timm_base(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model('vit_base_patch16_224', pretrained=False).eval()
    path = tmp_path / 'vit_base.pth'
    torch.save(ref.state_dict(), path)
    model = PromptedViT(arch='base', final_norm=True, init_cfg=dict(
        type='Pretrained', checkpoint=str(path))).eval()
    model.init_weights()
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        expected = ref.forward_features(x)[:, 1:]  # drop CLS
        (feat, ) = model(x)
    got = feat.flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_plain_vit_matches_timm_tiny_other_size(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model('vit_tiny_patch16_224', pretrained=False,
                            dynamic_img_size=True).eval()
    path = tmp_path / 'vit_tiny.pth'
    torch.save({'model': ref.state_dict()}, path)
    # timm resamples the position embedding with antialiasing; bpt_mm's
    # default is MAE's/ViTDet's plain bicubic (tests/test_layouts.py).
    model = PromptedViT(arch='tiny', final_norm=True,
                        pos_embed_antialias=True, init_cfg=dict(
                            type='Pretrained', checkpoint=str(path))).eval()
    model.init_weights()
    x = torch.rand(2, 3, 160, 96)
    with torch.no_grad():
        expected = ref.forward_features(x)[:, 1:]
        (feat, ) = model(x)
    assert feat.shape == (2, 192, 10, 6)
    torch.testing.assert_close(
        feat.flatten(2).transpose(1, 2), expected, atol=1e-5, rtol=1e-5)


def test_input_not_multiple_of_patch_is_padded():
    model = small_vit().eval()
    x = torch.rand(1, 3, 30, 21)
    padded = torch.nn.functional.pad(x, (0, 3, 0, 2))
    with torch.no_grad():
        (a, ), (b, ) = model(x), model(padded)
    assert a.shape == (1, 32, 4, 3)
    torch.testing.assert_close(a, b)


def test_out_indices_give_one_map_per_block():
    model = small_vit(out_indices=(0, -1)).eval()
    outs = model(torch.rand(2, 3, 32, 48))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 4, 6)] * 2
    assert not torch.allclose(outs[0], outs[1])


# ------------------------------------------------------------ parameter counts
@pytest.mark.parametrize('prompt, expected', [
    (dict(type='VPTPrompt', num_tokens=100), 76_800),
    (dict(type='WhitenedPrompt', num_tokens=100), 76_800),
    (dict(type='WhitenedPrompt', num_tokens=100, tunable=True), 666_624),
    (dict(type='BilinearPrompt', num_tokens=100, rank=75), 65_100),
    (dict(type='BilinearPrompt', num_tokens=50, rank=50, depth='deep'),
     183_600),
    # deep, per method.md's table: m*d per block, plus d^2 / d*p in the
    # blocks whose projection trains (top 4 by default)
    (dict(type='VPTPrompt', num_tokens=50, depth='deep'), 12 * 50 * 768),
    (dict(type='WhitenedPrompt', num_tokens=50, depth='deep'), 12 * 50 * 768),
    (dict(type='WhitenedPrompt', num_tokens=50, depth='deep', tunable=True),
     12 * 50 * 768 + 4 * 768 * 768),
    (dict(type='BilinearPrompt', num_tokens=50, rank=50, depth='deep',
          layers=(8, 9, 10, 11)), 4 * (50 * 50 + 768 * 50)),
    (dict(type='BilinearPrompt', num_tokens=50, rank=50, depth='deep',
          trainable_projection_layers=()), 12 * 50 * 50),
])
def test_trainable_parameter_counts_vit_base(prompt, expected):
    # Counting needs no memory: build on the meta device, in milliseconds.
    with torch.device('meta'):
        model = PromptedViT(arch='base', prompt=prompt)
    assert n_trainable(model) == expected
    counts = trainable_parameters(model)
    assert counts['backbone']['trainable'] == 0
    assert counts['all']['trainable'] == expected


def test_fwhiten_w_is_a_buffer_and_twhiten_w_a_parameter():
    f = small_vit(prompt=dict(type='WhitenedPrompt', num_tokens=4))
    t = small_vit(prompt=dict(type='WhitenedPrompt', num_tokens=4,
                              tunable=True))
    assert 'prompts.0.whitening' in dict(f.named_buffers())
    assert 'prompts.0.whitening' in dict(t.named_parameters())
    # Same state-dict keys either way, so checkpoints move between them.
    assert set(f.state_dict()) == set(t.state_dict())
    assert 'prompts.0.whitening_ready' in f.state_dict()


def test_deep_projection_frozen_below_top_blocks_is_a_buffer():
    model = small_vit(prompt=dict(type='BilinearPrompt', num_tokens=4, rank=3,
                                  depth='deep',
                                  trainable_projection_layers=(2, )))
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    assert 'prompts.2.basis' in params
    assert 'prompts.0.basis' in buffers and 'prompts.1.basis' in buffers
    assert all(f'prompts.{i}.coefficients' in params for i in range(3))


def test_default_trainable_projection_is_top_four_prompted_blocks():
    model = PromptedViT(arch=dict(embed_dims=32, num_layers=6, num_heads=2),
                        prompt=dict(type='BilinearPrompt', num_tokens=4,
                                    rank=2, depth='deep'))
    assert model.prompt_cfg['trainable_projection_layers'] == (2, 3, 4, 5)
    lean = PromptedViT(arch=dict(embed_dims=32, num_layers=6, num_heads=2),
                       prompt=dict(type='BilinearPrompt', num_tokens=4,
                                   rank=2, depth='deep', layers=(0, 1)))
    assert lean.prompt_cfg['trainable_projection_layers'] == (0, 1)


# ------------------------------------------------------------------- freezing
@pytest.mark.parametrize('prompt', [
    dict(type='VPTPrompt', num_tokens=3),
    dict(type='WhitenedPrompt', num_tokens=3, tunable=True,
         allow_identity_whitening=True),
    dict(type='BilinearPrompt', num_tokens=3, rank=2),
    dict(type='BilinearPrompt', num_tokens=3, rank=2, depth='deep',
         layers=(1, 2)),
])
def test_frozen_weights_get_no_grad_prompts_do(prompt):
    model = small_vit(prompt=prompt).train()
    (out, ) = model(torch.rand(2, 3, 32, 32))
    out.square().mean().backward()
    for name, param in model.named_parameters():
        if name.startswith('prompts.'):
            assert param.requires_grad and param.grad is not None, name
            assert param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name


def test_train_keeps_frozen_parts_in_eval_mode():
    model = small_vit(drop_path_rate=0.5,
                      prompt=dict(type='VPTPrompt', num_tokens=2,
                                  dropout=0.1)).train()
    assert all(not m.training for m in model.blocks.modules())
    assert not model.patch_embed.training
    assert model.prompt_dropout.training
    unfrozen = small_vit(frozen=False).train()
    assert unfrozen.blocks[0].training
    assert n_trainable(unfrozen) == sum(p.numel()
                                        for p in unfrozen.parameters())


def test_frozen_linear_probe_runs_without_autograd():
    model = small_vit().train()
    (out, ) = model(torch.rand(1, 3, 32, 32))
    assert not out.requires_grad  # nothing in the backbone trains


# ------------------------------------------------------------ prompt placement
def _reference_forward(model, x, prompts_per_block, shallow):
    """Straightforward version: prompts are tokens of the sequence."""
    tokens, _ = model._embed(x)
    B = x.shape[0]
    outs = []
    if shallow:
        p = prompts_per_block[0].expand(B, -1, -1)
        tokens = torch.cat([tokens[:, :1], p, tokens[:, 1:]], dim=1)
        for blk in model.blocks:
            tokens = blk(tokens)  # timm's own forward
            outs.append(tokens[:, 1 + p.shape[1]:])
        return outs
    for i, blk in enumerate(model.blocks):
        if i in prompts_per_block:
            p = prompts_per_block[i].expand(B, -1, -1)
            seq = torch.cat([tokens[:, :1], p, tokens[:, 1:]], dim=1)
            seq = blk(seq)
            tokens = torch.cat([seq[:, :1], seq[:, 1 + p.shape[1]:]], dim=1)
        else:
            tokens = blk(tokens)
        outs.append(tokens[:, 1:])
    return outs


@pytest.mark.parametrize('depth, layers', [('shallow', None), ('deep', None),
                                           ('deep', (1, 2))])
def test_prompts_match_straightforward_sequence_version(depth, layers):
    torch.manual_seed(0)
    prompt = dict(type='BilinearPrompt', num_tokens=5, rank=4, depth=depth)
    if layers:
        prompt['layers'] = layers
    model = small_vit(prompt=prompt).eval()
    x = torch.rand(2, 3, 32, 40)
    ref_prompts = {i: model.prompt_tokens(i) for i in model.prompt_modules()}
    expected = _reference_forward(model, x, ref_prompts, depth == 'shallow')
    num_prefix = model.num_sequence_prefix_tokens
    got = [out[:, num_prefix:] for _, _, out, _ in model.iter_blocks(x)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    # Gradients of the prompts agree too.
    g_loss = got[-1].square().sum()
    e_loss = expected[-1].square().sum()
    params = [p for p in model.parameters() if p.requires_grad]
    g_grads = torch.autograd.grad(g_loss, params)
    e_grads = torch.autograd.grad(e_loss, params)
    for a, b in zip(g_grads, e_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_deep_prompts_leave_lower_blocks_unchanged():
    torch.manual_seed(0)
    plain = small_vit().eval()
    prompted = small_vit(prompt=dict(type='VPTPrompt', num_tokens=4,
                                     depth='deep', layers=(2, ))).eval()
    prompted.load_state_dict(plain.state_dict(), strict=False)
    x = torch.rand(1, 3, 32, 32)
    plain_out = [o for _, _, o, _ in plain.iter_blocks(x)]
    prompted_out = [o for _, _, o, _ in prompted.iter_blocks(x)]
    torch.testing.assert_close(prompted_out[0], plain_out[0])
    torch.testing.assert_close(prompted_out[1], plain_out[1])
    assert not torch.allclose(prompted_out[2], plain_out[2])


def test_deep_blocks_below_first_prompt_run_without_autograd():
    model = small_vit(prompt=dict(type='VPTPrompt', num_tokens=2, depth='deep',
                                  layers=(2, ))).train()
    outs = [o for _, _, o, _ in model.iter_blocks(torch.rand(1, 3, 32, 32))]
    assert not outs[0].requires_grad and not outs[1].requires_grad
    assert outs[2].requires_grad


def test_class_token_first_then_prompts():
    model = small_vit(prompt=dict(type='VPTPrompt', num_tokens=3)).eval()
    _, tokens_in, _, _ = next(model.iter_blocks(torch.rand(1, 3, 32, 32)))
    embedded, _ = model._embed(torch.rand(1, 3, 32, 32))
    torch.testing.assert_close(tokens_in[0, 1:4], model.prompt_tokens(0))
    # the class token (with its position embedding) stays at index 0
    torch.testing.assert_close(
        tokens_in[0, 0], (model.cls_token + model.pos_embed[:, :1])[0, 0])
    assert tokens_in.shape[1] == 1 + 3 + 16 == embedded.shape[1] + 3


def test_backbone_reads_its_typed_config_not_the_flat_dict():
    # prompt_cfg is the flat view of prompt_config for users and reports;
    # the backbone reads only prompt_config, so editing the dict changes
    # nothing it does.
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32)
    model = small_vit(prompt=dict(type='VPTPrompt', num_tokens=3,
                                  depth='deep', layers=(1, 2))).eval()
    with torch.no_grad():
        (expected, ) = model(x)
    prefix = model.num_sequence_prefix_tokens
    model.prompt_cfg.update(depth='shallow', num_tokens=7, layers=(0, ))
    with torch.no_grad():
        (got, ) = model(x)
    torch.testing.assert_close(got, expected)
    assert model.num_sequence_prefix_tokens == prefix == 1
    outs = [o for _, _, o, _ in model.train().iter_blocks(x)]
    assert [o.requires_grad for o in outs] == [False, True, True]

    lenient = small_vit(prompt=dict(type='WhitenedPrompt', num_tokens=2,
                                    allow_identity_whitening=True)).train()
    lenient.prompt_cfg['allow_identity_whitening'] = False
    (out, ) = lenient(x)  # still trains with the identity
    assert out.shape == (1, 32, 4, 4)


def test_gradient_checkpointing_same_outputs_and_grads():
    torch.manual_seed(0)
    prompt = dict(type='BilinearPrompt', num_tokens=3, rank=2)
    a = small_vit(prompt=prompt).train()
    b = small_vit(prompt=prompt, with_cp=True).train()
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 32, 32)
    (oa, ), (ob, ) = a(x), b(x)
    torch.testing.assert_close(oa, ob)
    oa.sum().backward()
    ob.sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.requires_grad:
            torch.testing.assert_close(pa.grad, pb.grad, msg=n)


# ------------------------------------------------------------ windowed blocks
def test_window_covering_the_grid_equals_global_attention():
    torch.manual_seed(0)
    glob = small_vit(class_token=False).eval()
    win = small_vit(class_token=False, window_size=4).eval()
    win.load_state_dict(glob.state_dict())
    x = torch.rand(1, 3, 32, 32)  # 4 x 4 patches: one window
    torch.testing.assert_close(win(x)[0], glob(x)[0])


def test_windowed_blocks_are_local_and_keep_prompts_fixed():
    torch.manual_seed(0)
    model = small_vit(window_size=2, global_attn_indexes=(2, ),
                      out_indices=(1, ),
                      prompt=dict(type='VPTPrompt', num_tokens=2)).eval()
    x = torch.rand(1, 3, 32, 32)
    x2 = x.clone()
    x2[..., 16:, 16:] = torch.rand(1, 3, 16, 16)  # change the last window
    (a, ), (b, ) = model(x), model(x2)
    # top-left 2x2 patches (one window) unaffected by the bottom-right ones
    torch.testing.assert_close(a[..., :2, :2], b[..., :2, :2])
    assert not torch.allclose(a[..., 2:, 2:], b[..., 2:, 2:])
    steps = list(model.iter_blocks(x))
    _, tin, tout, _ = steps[0]  # block 0 is windowed
    torch.testing.assert_close(tin[:, :3], tout[:, :3])  # CLS + prompts
    _, tin, tout, _ = steps[2]  # block 2 is global
    assert not torch.allclose(tin[:, :3], tout[:, :3])


def test_windowed_block_with_padding_runs():
    model = small_vit(window_size=3, prompt=dict(
        type='VPTPrompt', num_tokens=2, depth='deep')).eval()
    (out, ) = model(torch.rand(1, 3, 40, 32))  # 5 x 4 grid, windows of 3
    assert out.shape == (1, 32, 5, 4)


# ------------------------------------------------------------------ whitening
def test_training_refuses_unfilled_whitening_with_advice():
    model = small_vit(prompt=dict(type='WhitenedPrompt', num_tokens=2))
    model.eval()
    model(torch.rand(1, 3, 32, 32))  # eval (the whitening hook) is allowed
    model.train()
    with pytest.raises(WhiteningNotReadyError, match='BPTWhiteningHook'):
        model(torch.rand(1, 3, 32, 32))
    model.prompts['0'].set_whitening(2 * torch.eye(32))
    (out, ) = model(torch.rand(1, 3, 32, 32))
    assert out.shape == (1, 32, 4, 4)


def test_whitening_init_bilinear_also_needs_whitening():
    model = small_vit(prompt=dict(type='BilinearPrompt', num_tokens=2, rank=2,
                                  whitening_init=True)).train()
    with pytest.raises(WhiteningNotReadyError):
        model(torch.rand(1, 3, 32, 32))
    allowed = small_vit(prompt=dict(type='BilinearPrompt', num_tokens=2,
                                    rank=2, whitening_init=True,
                                    allow_identity_whitening=True)).train()
    allowed(torch.rand(1, 3, 32, 32))


def test_whitened_prompt_is_p_times_w_transpose():
    model = small_vit(prompt=dict(type='WhitenedPrompt', num_tokens=3))
    w = torch.randn(32, 32)
    model.prompts['0'].set_whitening(w)
    torch.testing.assert_close(model.prompt_tokens(0),
                               model.prompts['0'].tokens @ w.t())
    assert bool(model.prompts['0'].whitening_ready)


# ----------------------------------------------------------------- layer depth
def test_get_layer_depth():
    model = small_vit(prompt=dict(type='VPTPrompt', num_tokens=2,
                                  depth='deep'))
    assert model.get_layer_depth('backbone.pos_embed', 'backbone.') == (0, 5)
    assert model.get_layer_depth('backbone.patch_embed.proj.weight',
                                 'backbone.') == (0, 5)
    assert model.get_layer_depth('backbone.blocks.2.attn.qkv.weight',
                                 'backbone.') == (3, 5)
    assert model.get_layer_depth('backbone.prompts.1.tokens',
                                 'backbone.') == (2, 5)
    assert model.get_layer_depth('backbone.norm.weight', 'backbone.') == (4, 5)
    assert model.get_layer_depth('neck.conv.weight', 'backbone.') == (4, 5)


# ----------------------------------------------------------------- bad values
@pytest.mark.parametrize('kwargs, exc, pattern', [
    (dict(arch='gigantic'), ValueError, r"`arch` must be one of .*'base'"),
    (dict(arch='Bsae'), ValueError, r"got 'Bsae' \(did you mean 'base'\?\)"),
    (dict(arch=dict(embed_dims=32, num_layers=2)), ValueError, 'num_heads'),
    (dict(arch=dict(embed_dims=30, num_layers=2, num_heads=4)), ValueError,
     'divisible'),
    (dict(out_indices=3), ValueError, r'`out_indices`.*\[-3, 2\]'),
    (dict(out_indices=(0, 0)), ValueError, 'duplicated'),
    (dict(patch_size=0), ValueError, '`patch_size` must be a positive int'),
    (dict(arch=dict(embed_dims=32, num_layers=0, num_heads=2)), ValueError,
     '`arch.num_layers` must be a positive int'),
    (dict(window_size=-1), ValueError, '`window_size`'),
    (dict(global_attn_indexes=(1, )), ValueError, 'window_size'),
    (dict(prompt=dict(type='LoRAPrompt', num_tokens=2)), ValueError,
     r"`prompt.type` must be one of \['BilinearPrompt', 'SPTPrompt', "
     r"'VPTPrompt', 'WhitenedPrompt'\]"),
    (dict(prompt=dict(type='VPTPrompt', num_token=2)), ValueError,
     r"`prompt.num_token`.*did you mean 'num_tokens'"),
    (dict(prompt=dict(type='VPTPrompt', num_tokens='100')), TypeError,
     '`prompt.num_tokens` must be a positive int'),
    (dict(prompt=dict(type='VPTPrompt', num_tokens=0)), ValueError,
     '`prompt.num_tokens`'),
    (dict(prompt=dict(type='VPTPrompt')), ValueError, 'num_tokens'),
    (dict(prompt=dict(type='BilinearPrompt', num_tokens=2, rank=0)),
     ValueError, '`prompt.rank` must be a positive int'),
    (dict(prompt=dict(type='BilinearPrompt', num_tokens=2)), ValueError,
     '`prompt.rank` is required for BilinearPrompt'),
    (dict(prompt=dict(type='BilinearPrompt', num_tokens=2, rank=2.5)),
     TypeError, '`prompt.rank` must be a positive int'),
    (dict(prompt=dict(type='VPTPrompt', num_tokens=2, rank=3)), ValueError,
     r'`prompt.rank` for VPTPrompt'),
    (dict(prompt=dict(type='VPTPrompt', num_tokens=2, depth='both')),
     ValueError, "`prompt.depth` must be 'shallow' or 'deep'"),
    (dict(prompt=dict(type='VPTPrompt', num_tokens=2, depth='deep',
                      layers=(0, 3))), ValueError,
     r'`prompt.layers` entries .*\[-3, 2\]'),
    (dict(prompt=dict(type='VPTPrompt', num_tokens=2, depth='deep',
                      layers=(1, 1))), ValueError, 'duplicated'),
    (dict(prompt=dict(type='VPTPrompt', num_tokens=2, layers=(1, ))),
     ValueError, r"`prompt.layers` is only for depth='deep'"),
    (dict(prompt=dict(type='VPTPrompt', num_tokens=2, depth='deep',
                      trainable_projection_layers=(1, ))), ValueError,
     'trainable projection'),
    (dict(prompt=dict(type='WhitenedPrompt', num_tokens=2, depth='deep',
                      trainable_projection_layers=(1, ))), ValueError,
     'tunable=False'),
    (dict(prompt=dict(type='BilinearPrompt', num_tokens=2, rank=2,
                      depth='deep', layers=(1, 2),
                      trainable_projection_layers=(0, ))), ValueError,
     r'\[0\] are not prompted blocks'),
    (dict(prompt=dict(type='VPTPrompt', num_tokens=2, dropout=1.5)),
     ValueError, '`prompt.dropout`'),
    (dict(prompt=dict(type='WhitenedPrompt', num_tokens=2, tunable='yes')),
     TypeError, '`tunable`'),
    (dict(prompt=['VPTPrompt']), TypeError, '`prompt` must be None or a dict'),
])
def test_bad_values_name_the_key(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        small_vit(**kwargs)


def test_rank_above_min_warns():
    with pytest.warns(UserWarning, match='without adding rank'):
        small_vit(prompt=dict(type='BilinearPrompt', num_tokens=4, rank=8))


def test_block_forward_matches_timm_block():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1,
                            num_heads=2).eval()
    x = torch.randn(2, 17, 32)
    torch.testing.assert_close(prompted_block_forward(vit.blocks[0], x),
                               vit.blocks[0](x), atol=1e-6, rtol=1e-5)


def test_init_cfg_loads_mae_checkpoint_keeping_prompts(tmp_path):
    torch.manual_seed(0)
    src = small_vit(img_size=32)
    encoder = {k: v for k, v in src.state_dict().items()}
    mae = dict(encoder)
    mae['mask_token'] = torch.zeros(1, 1, 16)
    mae['decoder_embed.weight'] = torch.zeros(16, 32)
    mae['decoder_pos_embed'] = torch.zeros(1, 17, 16)
    mae['decoder_pred.weight'] = torch.zeros(192, 16)
    path = tmp_path / 'mae_pretrain.pth'
    torch.save({'model': mae, 'epoch': 799}, path)
    # a different pretraining grid (48 px) forces position resampling
    model = small_vit(img_size=48, prompt=dict(type='BilinearPrompt',
                                               num_tokens=3, rank=2),
                      init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    prompts_before = {k: v.clone() for k, v in model.prompts.state_dict()
                      .items()}
    model.init_weights()
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight,
                               src.blocks[1].attn.qkv.weight)
    assert model.pos_embed.shape == (1, 1 + 36, 32)
    for k, v in model.prompts.state_dict().items():
        torch.testing.assert_close(v, prompts_before[k])
    # still frozen after loading
    assert not model.blocks[1].attn.qkv.weight.requires_grad


def test_init_cfg_bad_keys_are_named(tmp_path):
    with pytest.raises(ValueError, match='`checkpoint`'):
        small_vit(init_cfg=dict(type='Pretrained')).init_weights()
    with pytest.raises(ValueError, match="unknown \\['prefix'\\]"):
        small_vit(init_cfg=dict(type='Pretrained', checkpoint='x.pth',
                                prefix='backbone.')).init_weights()
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        small_vit(init_cfg=dict(type='Pretrained',
                                checkpoint=str(tmp_path / 'missing.pth'))
                  ).init_weights()


@pytest.mark.usefixtures('exact_fp32_matmul')
@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('window', [0, 2])
def test_inference_caches_deep_prompt_keys_values_until_weights_change(
        window, device):
    torch.manual_seed(0)
    model = small_vit(window_size=window,
                      global_attn_indexes=(2, ) if window else (),
                      prompt=dict(type='BilinearPrompt', num_tokens=3,
                                  rank=2, depth='deep'))
    model.eval()
    x = torch.rand(2, 3, 32, 48)
    if device != 'cpu':
        with torch.no_grad():
            model(x)  # fills the cache with CPU tensors
        model.to(device)
        x = x.to(device)

    def uncached():  # autograd on: the prompts are recomputed
        with torch.enable_grad():
            return model(x)[0].detach()

    with torch.no_grad():
        first = model(x)[0]
        kv = {i: entry[1] for i, entry in model._prompt_kv_cache.items()}
        again = model(x)[0]
    assert sorted(kv) == [0, 1, 2]
    # on another device, moving the model made the CPU entries stale: they
    # were recomputed there
    assert all(t.device.type == device for pair in kv.values() for t in pair)
    # a second forward reuses the very same tensors
    assert all(model._prompt_kv_cache[i][1] is kv[i] for i in kv)
    torch.testing.assert_close(first, uncached(), rtol=0, atol=1e-6)
    assert torch.equal(first, again)

    # an optimizer step on the prompts (in place) invalidates the cache
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(x)[0].sum().backward()
    optimizer.step()
    with torch.no_grad():
        stepped = model(x)[0]
    assert not torch.allclose(stepped, first)
    torch.testing.assert_close(stepped, uncached(), rtol=0, atol=1e-6)

    # so does loading other weights, frozen ones included
    state = {k: v + 0.01 for k, v in model.state_dict().items()
             if k.startswith('blocks.1.attn.qkv')}
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        loaded = model(x)[0]
    torch.testing.assert_close(loaded, uncached(), rtol=0, atol=1e-6)
    assert not torch.allclose(loaded, stepped)


def test_one_rank_rule_applied_where_the_prompt_is_built():
    # d = 32: a whitening-initialised basis cannot have more columns.
    with pytest.raises(ValueError, match=r'`prompt.rank`=33 is above '
                                         r'embed_dims=32'):
        small_vit(prompt=dict(type='BilinearPrompt', num_tokens=40,
                              rank=33, whitening_init=True))
    with pytest.raises(ValueError, match='`prompt.rank`=33'):
        small_vit(prompt=dict(type='BilinearPrompt', num_tokens=40,
                              rank=33, whitening_init=True, depth='deep'))
    # Without whitening it only adds parameters that add no rank: warned.
    with pytest.warns(UserWarning, match=r'`prompt.rank`=33 is above '
                                         r'min\(num_tokens, embed_dims\)=32'):
        model = small_vit(prompt=dict(type='BilinearPrompt', num_tokens=40,
                                      rank=33))
    assert model.prompts['0'].rank == 33
    with pytest.warns(UserWarning, match=r'`prompt.rank`=5 is above'):
        small_vit(prompt=dict(type='BilinearPrompt', num_tokens=4, rank=5,
                              whitening_init=True))
