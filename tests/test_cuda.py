"""The CUDA paths: attention shortcuts, AMP train steps, whitening and the
benchmark's CUDA memory.

Every test here needs a CUDA device and is skipped (and counted as skipped
in pytest's summary) without one. tools/gpu_check.sh runs them on a GPU,
with the CUDA cases of the CPU tests that take a ``device`` parameter
(helpers.DEVICES): the frozen-patch block and the deep-prompt key/value
cache.
"""
import copy
import json
import os.path as osp
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bpt_mm.models import attention
from bpt_mm.models.attention import (attention_frozen_self_keys,
                                     attention_with_logsumexp)
from bpt_mm.whitening.collect import collect_whitening, whitening_from_tokens
from bpt_mm.whitening.linalg import (project_tokens, query_key_product,
                                     zca_whitening_matrix)
from bpt_mm.whitening.options import WhiteningOptions
from helpers import (ROOT, assert_same_outputs_and_grads, count_calls,
                     small_vit)
from whitening_toy import deep_backbone, toy_images

# exact_fp32_matmul (conftest.py): the comparisons hold to 1e-5, which
# TF32 would not.
pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason='needs CUDA'),
              pytest.mark.usefixtures('exact_fp32_matmul')]

CUDA = torch.device('cuda')
#: One prompt config of each kind, shallow and deep.
PROMPTS = {
    'vpt_shallow': dict(type='VPTPrompt', num_tokens=4),
    'vpt_deep': dict(type='VPTPrompt', num_tokens=4, depth='deep'),
    'fwhiten_shallow': dict(type='WhitenedPrompt', num_tokens=4),
    'twhiten_deep': dict(type='WhitenedPrompt', num_tokens=4, tunable=True,
                         depth='deep'),
    'bilinear_shallow': dict(type='BilinearPrompt', num_tokens=4, rank=3),
    'bilinear_deep_whitened': dict(type='BilinearPrompt', num_tokens=4,
                                   rank=3, depth='deep',
                                   whitening_init=True),
}


# ------------------------------------------------------ attention shortcuts
@pytest.mark.parametrize('use_fused', [True, False])
def test_logsumexp_attention_on_cuda_matches_explicit_softmax(use_fused):
    # On CUDA both settings take the explicit (chunked) path: the fused
    # kernel is the CPU's.
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, device=CUDA) for n in (7, 11, 11))
    scores = (q.double() @ k.double().transpose(-2, -1)) / 8 ** 0.5
    out, lse = attention_with_logsumexp(q, k, v, use_fused=use_fused)
    assert out.device.type == 'cuda' and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), scores.softmax(-1) @ v.double(),
                               atol=1e-5, rtol=1e-5)


def test_frozen_self_keys_on_cuda_match_sdpa_outputs_and_grads(monkeypatch):
    # a tiny budget splits the queries into chunks on the CUDA path
    monkeypatch.setattr(attention, '_SCORES_BUDGET', 4 * 2 * 3 * 40 * 5)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 8, device=CUDA) * 3 for _ in range(3))
    ek = (torch.randn(1, 3, 4, 8, device=CUDA) * 3).requires_grad_()
    ev = torch.randn(1, 3, 4, 8, device=CUDA).requires_grad_()
    expected = F.scaled_dot_product_attention(
        q, torch.cat([k, ek.expand(2, -1, -1, -1)], 2),
        torch.cat([v, ev.expand(2, -1, -1, -1)], 2))
    got = attention_frozen_self_keys(q, k, v, ek, ev)
    assert_same_outputs_and_grads(got, expected, [ek, ev])
    # and the CPU (fused kernel) gives the same
    on_cpu = attention_frozen_self_keys(q.cpu(), k.cpu(), v.cpu(),
                                        ek.detach().cpu(), ev.detach().cpu())
    torch.testing.assert_close(got.detach().cpu(), on_cpu, atol=1e-5,
                               rtol=1e-5)


def test_shallow_forward_on_cuda_takes_shortcuts_and_matches_cpu(
        monkeypatch):
    torch.manual_seed(0)
    model = small_vit(prompt=dict(type='BilinearPrompt', num_tokens=5,
                                  rank=4)).train()
    on_cuda = copy.deepcopy(model).to(CUDA)
    x = torch.rand(2, 3, 32, 40)
    (expected, ) = model(x)
    calls = count_calls(monkeypatch, 'attention_frozen_self_keys')
    (got, ) = on_cuda(x.to(CUDA))
    assert calls == ['attention_frozen_self_keys']
    weight = torch.randn_like(expected)
    (expected * weight).sum().backward()
    (got * weight.to(CUDA)).sum().backward()
    torch.testing.assert_close(got.detach().cpu(), expected, atol=1e-5,
                               rtol=1e-5)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained
    cuda_params = dict(on_cuda.named_parameters())
    for name, p in trained:
        torch.testing.assert_close(cuda_params[name].grad.cpu(), p.grad,
                                   atol=1e-5, rtol=1e-4, msg=name)


# --------------------------------------------------------------------- AMP
@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
@pytest.mark.parametrize('prompt', sorted(PROMPTS))
def test_amp_train_steps_of_each_prompt_type(prompt, dtype):
    """Three AmpOptimWrapper steps (what --amp trains with) on CUDA: the
    forward agrees with fp32, the loss stays finite, the prompts move and
    nothing frozen gets a gradient."""
    from mmengine.optim import AmpOptimWrapper

    from bpt_mm.launch import native_bf16
    if dtype == 'bfloat16' and not native_bf16():
        pytest.skip(f'{torch.cuda.get_device_name()} has no native bf16 '
                    f'(--amp uses fp16 there)')
    torch.manual_seed(0)
    backbone = small_vit(prompt=dict(PROMPTS[prompt])).to(CUDA)
    head = torch.nn.Conv2d(backbone.embed_dims, 1, 1).to(CUDA)
    x = torch.rand(2, 3, 32, 40, device=CUDA)
    # the data-driven step of whitened prompts, on CUDA
    if any(p.needs_whitening for p in backbone.prompts.values()):
        collect_whitening(backbone, [x], num_images=2, distributed=False,
                          options=WhiteningOptions(eps=1e-3))
    backbone.train()
    params = [p for p in list(backbone.parameters()) + list(head.parameters())
              if p.requires_grad]
    before = [p.detach().clone() for p in params]
    # --amp's scaler is dynamic from 2**16 and backs off after an overflow
    # (a skipped step); starting lower keeps the three steps from being
    # spent backing off.
    wrapper = AmpOptimWrapper(optimizer=torch.optim.SGD(params, lr=0.05),
                              dtype=dtype, loss_scale=dict(init_scale=2.**10))
    assert wrapper.cast_dtype == getattr(torch, dtype)

    with torch.no_grad():
        reference = backbone(x)[-1].float()
        with wrapper.optim_context(backbone):
            mixed = backbone(x)[-1].float()
    tolerance = 2e-2 if dtype == 'float16' else 1e-1
    assert (mixed - reference).abs().max() <= \
        tolerance * reference.abs().max()

    reached = [False] * len(params)
    for _ in range(3):
        with wrapper.optim_context(backbone):
            loss = head(backbone(x)[-1]).float().pow(2).mean()
        assert torch.isfinite(loss)
        # update_params() in its parts, to see the (scaled) gradients
        wrapper.backward(loss)
        for i, p in enumerate(params):
            reached[i] |= bool(p.grad is not None and p.grad.abs().sum() > 0)
        wrapper.step()
        wrapper.zero_grad()
    assert all(reached), \
        f'{reached.count(False)} trainable tensors never got a gradient'
    # A whitening matrix of a random ViT has entries in the thousands, so
    # its updates may be below float32's resolution: the prompt tokens and
    # the head must move, and nothing may become non-finite.
    moved = [not torch.equal(a, p.detach()) for a, p in zip(before, params)]
    assert moved[0] and moved[-1]
    assert all(torch.isfinite(p).all() for p in params)
    assert not any(p.grad is not None for p in backbone.parameters()
                   if not p.requires_grad)


# --------------------------------------------------------------- whitening
def assert_close_rel(got, expected, rtol=1e-6):
    """Equal to ``rtol`` relative to the largest entry of ``expected``."""
    got = got.cpu().to(expected.dtype)
    torch.testing.assert_close(got, expected, rtol=rtol,
                               atol=rtol * float(expected.abs().max()))


@pytest.mark.parametrize('statistic', ['paper', 'authors'])
def test_whitening_on_cuda_equals_cpu(statistic):
    torch.manual_seed(0)
    tokens = torch.randn(6, 20, 32) * torch.linspace(0.1, 3.0, 32)
    qkv = torch.randn(96, 32) * 0.2
    options = WhiteningOptions(statistic=statistic, eps=1e-4)
    # CUDA inputs: projected on CUDA, accumulated where the accumulator is
    w_cpu, info_cpu = whitening_from_tokens(tokens, qkv, options)
    w_cuda, info_cuda = whitening_from_tokens(tokens.to(CUDA), qkv.to(CUDA),
                                              options)
    assert_close_rel(w_cuda, w_cpu)
    assert_close_rel(info_cuda['sigma'], info_cpu['sigma'])
    # an accumulator on CUDA (as the hook uses with a model on CUDA) and the
    # ZCA matrix computed there
    product = query_key_product(qkv.double(), order=options.product)
    sigmas = []
    for device in ('cpu', CUDA):
        acc = options.make_accumulator(32, device=device)
        acc.update(project_tokens(tokens.double().to(device),
                                  product.to(device)))
        sigmas.append(acc.second_moment())
    assert sigmas[1].device.type == CUDA.type
    assert_close_rel(sigmas[1], sigmas[0])
    w_on_cuda = zca_whitening_matrix(sigmas[1], eps=1e-4)
    assert w_on_cuda.device.type == CUDA.type
    assert_close_rel(w_on_cuda, zca_whitening_matrix(sigmas[0], eps=1e-4))


def test_collected_whitening_on_cuda_equals_cpu():
    """The whole collection (forward to each block, accumulate, ZCA, written
    into the deep prompts) in float64 on both devices, so that only the
    devices differ."""
    images = toy_images(6).double()
    on_cpu = deep_backbone().double()
    on_cuda = copy.deepcopy(on_cpu).to(CUDA)
    stats = WhiteningOptions(eps=1e-3)
    expected = collect_whitening(on_cpu, images.split(4), stats,
                                 num_images=6, distributed=False)
    got = collect_whitening(on_cuda, images.to(CUDA).split(4), stats,
                            num_images=6, distributed=False)
    assert sorted(got) == sorted(expected) == [0, 1, 2]
    for block in expected:
        for key in ('whitening', 'sigma'):
            assert_close_rel(got[block][key], expected[block][key])
        assert on_cuda.prompts[str(block)].whitening.device.type == 'cuda'


# --------------------------------------------------------------- benchmark
def test_benchmark_reports_cuda_peak_memory(tmp_path):
    out = tmp_path / 'bench.json'
    names = ['full_finetune', 'frozen']
    run = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools', 'benchmark.py'), '--arch',
         'tiny', '--size', '64', '--steps', '1', '--warmup', '1', '--out',
         str(out), '--variants', *names],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())['rows']
    assert [r['variant'] for r in rows] == names
    full, frozen = rows
    for row in rows:
        assert row['device'].startswith('cuda')
        assert row['peak_kind'] == 'cuda_max_allocated'
        assert row['model_mb'] == row['peak_mb'] > 0
    # full fine-tuning also holds gradients and AdamW's two moments
    assert frozen['peak_mb'] < full['peak_mb']
    assert '| peak CUDA MB |' in run.stdout
    assert 'above runtime' not in run.stdout
