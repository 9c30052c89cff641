"""Tests of the attention shortcuts: each must give what the plain
computation gives, outputs and gradients, and must actually be taken."""
import pytest
import torch
import torch.nn.functional as F

from bpt_mm.models import attention, vit
from bpt_mm.models.attention import (attention_frozen_self_keys,
                                     attention_with_logsumexp,
                                     prompted_block_forward)
from helpers import (DEVICES, assert_same_outputs_and_grads,
                     block_and_inputs, count_calls, small_vit)


# Tiny tensors gain nothing from threads, and the machine is shared.
pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.mark.parametrize('use_fused', [True, False])
def test_logsumexp_attention_matches_explicit_softmax(use_fused):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8) for n in (7, 11, 11))
    scores = q @ k.transpose(-2, -1) / 8 ** 0.5
    out, lse = attention_with_logsumexp(q, k, v, use_fused=use_fused)
    torch.testing.assert_close(lse, scores.logsumexp(-1))
    torch.testing.assert_close(out, scores.softmax(-1) @ v)


@pytest.mark.parametrize('use_fused', [True, False])
def test_frozen_self_keys_match_sdpa_outputs_and_extra_grads(use_fused,
                                                             monkeypatch):
    # a tiny budget makes the math path split the queries into chunks
    monkeypatch.setattr(attention, '_SCORES_BUDGET', 4 * 2 * 3 * 40 * 5)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 8) * 3 for _ in range(3))
    # one prompt set shared by the batch (batch 1), large logits included
    ek = (torch.randn(1, 3, 4, 8) * 3).requires_grad_()
    ev = torch.randn(1, 3, 4, 8).requires_grad_()
    expected = F.scaled_dot_product_attention(
        q, torch.cat([k, ek.expand(2, -1, -1, -1)], 2),
        torch.cat([v, ev.expand(2, -1, -1, -1)], 2))
    got = attention_frozen_self_keys(q, k, v, ek, ev, use_fused=use_fused)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    weight = torch.randn_like(expected)
    grads_expected = torch.autograd.grad((expected * weight).sum(), [ek, ev])
    grads_got = torch.autograd.grad((got * weight).sum(), [ek, ev])
    for a, b in zip(grads_got, grads_expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.usefixtures('exact_fp32_matmul')
@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('window', [0, 4])
@pytest.mark.parametrize('with_deep', [False, True])
def test_block_with_frozen_patches_equals_plain_block(window, with_deep,
                                                      device, monkeypatch):
    block, grid, prefix, patches, deep = block_and_inputs(window, 5, device)
    kv_tokens = deep if with_deep else None
    x = torch.cat([prefix, patches], 1)
    plain = prompted_block_forward(block, x, kv_tokens, window, 5, grid)
    calls = count_calls(monkeypatch, 'attention_frozen_self_keys')
    fast = prompted_block_forward(block, x, kv_tokens, window, 5, grid,
                                  frozen_patches=True)
    assert calls, 'the frozen-patch shortcut was not taken'
    assert_same_outputs_and_grads(fast, plain,
                                  [prefix, deep] if with_deep else [prefix])


def test_prefix_kv_only_block_keeps_prefix_and_equals_plain_patches():
    block, grid, prefix, patches, deep = block_and_inputs(0, 5)
    patches.requires_grad_()
    x = torch.cat([prefix, patches], 1)
    plain = prompted_block_forward(block, x, deep, 0, 5, grid)
    short = prompted_block_forward(block, x, deep, 0, 5, grid,
                                   prefix_kv_only=True)
    assert torch.equal(short[:, :5], x[:, :5])  # prefix rows not computed
    assert_same_outputs_and_grads(short[:, 5:], plain[:, 5:],
                                  [prefix, patches, deep])


@pytest.mark.parametrize('class_token', [True, False])
def test_shallow_forward_matches_sequence_version_and_takes_shortcuts(
        class_token, monkeypatch):
    """forward() runs block 0 with frozen patches and the last block with
    key/value-only prefix tokens; the outputs and the gradients of every
    trainable parameter are those of the plain sequence computation."""
    torch.manual_seed(0)
    model = small_vit(class_token=class_token, prompt=dict(
        type='BilinearPrompt', num_tokens=5, rank=4)).train()
    x = torch.rand(2, 3, 32, 40)
    calls = count_calls(monkeypatch, 'attention_frozen_self_keys')
    (got, ) = model(x)
    assert calls == ['attention_frozen_self_keys']  # block 0 only
    p = model.prompt_tokens(0).unsqueeze(0).expand(2, -1, -1)
    tokens, _ = model._embed(x)
    n = int(class_token)
    seq = torch.cat([tokens[:, :n], p, tokens[:, n:]], dim=1)
    for blk in model.blocks:
        seq = blk(seq)  # timm's own forward
    expected = seq[:, n + 5:].transpose(1, 2).reshape(got.shape)
    assert_same_outputs_and_grads(
        got, expected, [q for q in model.parameters() if q.requires_grad])


def test_shortcut_not_taken_when_the_patches_train():
    model = small_vit(frozen=False, prompt=dict(type='VPTPrompt',
                                                num_tokens=2)).train()
    x = torch.rand(1, 3, 32, 32)
    torch.manual_seed(0)
    model(x)[0].sum().backward()
    # the patch embedding gets its gradient through block 0's patch rows
    assert model.patch_embed.proj.weight.grad is not None
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_frozen_position_embeddings_resampled_once_until_changed(
        monkeypatch):
    calls = count_calls(monkeypatch, 'resample_pos_embed', vit)
    model = small_vit(prompt=dict(type='VPTPrompt', num_tokens=2)).train()
    x = torch.rand(1, 3, 48, 40)  # not the 32 x 32 pretraining grid
    first = model(x)[0]
    assert model(x)[0].shape == first.shape and len(calls) == 1
    with torch.no_grad():
        model.pos_embed.add_(1.0)  # bumps the version: stale
    changed = model(x)[0]
    assert len(calls) == 2 and not torch.allclose(changed, first)
    model(torch.rand(1, 3, 40, 40))  # another size, resampled once more
    assert len(calls) == 3

    trainable = small_vit(frozen=False).train()
    trainable(x)
    trainable(x)
    assert len(calls) == 5  # a trained table is resampled every time




@pytest.mark.parametrize('with_cp', [False, True])
def test_windowed_shallow_forward_matches_plain_blocks(with_cp, monkeypatch):
    """Windowed blocks (with padding) and a global one: the shortcuts give
    the outputs and gradients of running every block plainly."""
    torch.manual_seed(0)
    model = small_vit(window_size=3, global_attn_indexes=(2, ),
                      with_cp=with_cp, prompt=dict(
                          type='BilinearPrompt', num_tokens=4,
                          rank=3)).train()
    x = torch.rand(2, 3, 40, 32)  # 5 x 4 patches, windows of 3: padded
    calls = count_calls(monkeypatch, 'attention_frozen_self_keys')
    (got, ) = model(x)
    assert calls == ['attention_frozen_self_keys']
    tokens, hw = model._embed(x)
    p = model.prompt_tokens(0).unsqueeze(0).expand(2, -1, -1)
    tokens = torch.cat([tokens[:, :1], p, tokens[:, 1:]], dim=1)
    for i, blk in enumerate(model.blocks):
        tokens = prompted_block_forward(blk, tokens, None,
                                        0 if i == 2 else 3, 5, hw)
    expected = tokens[:, 5:].transpose(1, 2).reshape(got.shape)
    assert_same_outputs_and_grads(
        got, expected, [q for q in model.parameters() if q.requires_grad])
