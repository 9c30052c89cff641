"""Tests of the data-driven whitening: collection, hook, file, tool.

A toy mmengine model (PromptedViT with d=32, 3 blocks, 2 heads; 32x32
images, 8x8 patches; a linear head) and an in-memory data set from
``tests/whitening_toy.py`` let a plain mmengine Runner train without mmdet.
"""
import copy
import os
import subprocess
import sys
import time

import pytest
import torch
from mmengine.hooks import Hook
from torch.utils.data import DataLoader

from bpt_mm.engine import BPTWhiteningHook
from bpt_mm.engine.whitening_hook import images_to_use
from bpt_mm.models import WhiteningNotReadyError
from bpt_mm.whitening.collect import (apply_whitening, collect_prototypes,
                                      collect_whitening,
                                      whitening_blocks, whitening_from_tokens)
from bpt_mm.whitening.io import load_whitening, save_whitening
from bpt_mm.whitening.linalg import (whitened_bilinear_basis,
                                     zca_whitening_matrix)
from bpt_mm.whitening.options import WhiteningOptions
from helpers import (ROOT, TESTS, count_calls, load_tool, previous_whitening,
                     small_vit)
from whitening_toy import (DEEP_PROMPT, DIST_OPTIONS, BPTWhiteningToyDataset,
                           BPTWhiteningToyModel, deep_backbone,
                           run_two_processes, toy_images, toy_runner)

F64 = torch.float64
EPS = 1e-3  # keeps W's gains moderate for a random tiny ViT
FWHITEN = dict(type='WhitenedPrompt', num_tokens=4)
TWHITEN = dict(type='WhitenedPrompt', num_tokens=4, tunable=True)


def assert_close_rel(actual, expected, rtol):
    """Equal up to ``rtol`` relative to the largest entry of ``expected``."""
    expected = expected.to(actual.dtype)
    atol = rtol * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


class Probe(Hook):
    """Records the prompt of block 0 at the first and after the last step."""

    priority = 'LOWEST'

    def __init__(self):
        self.first = self.last = None

    @staticmethod
    def _state(runner):
        prompt = runner.model.backbone.prompts['0']
        return {'whitening': prompt.whitening.detach().clone(),
                'ready': bool(prompt.whitening_ready),
                'requires_grad': prompt.whitening.requires_grad,
                'tokens': prompt.tokens.detach().clone()}

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if self.first is None:
            self.first = self._state(runner)

    def after_train(self, runner):
        self.last = self._state(runner)


# Tiny tensors gain nothing from threads, and the machine is shared.
pytestmark = pytest.mark.usefixtures('one_thread')


def manual_block0_whitening(backbone, images, eps):
    """ZCA of X~ = M X^T over the patch tokens entering block 0, by hand."""
    with torch.no_grad():
        tokens, _ = backbone._embed(images)  # [CLS, patches], no prompts
        patches = tokens[:, backbone.num_prefix_tokens:].reshape(
            -1, backbone.embed_dims).to(F64)
        w = backbone.blocks[0].attn.qkv.weight.to(F64)
        d = backbone.embed_dims
        product = w[:d].T @ w[d:2 * d]  # M = W_q^T W_k
        projected = patches @ product.T  # rows of X~^T
        sigma = projected.T @ projected / projected.shape[0]
    return zca_whitening_matrix(sigma, eps=eps)


# ---------------------------------------------------------------------------
# The hook in a Runner
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('tunable', [False, True], ids=['fWhiten', 'tWhiten'])
def test_hook_fills_whitening_before_first_step(tmp_path, tunable):
    hook = BPTWhiteningHook(num_images=8, eps=EPS)
    probe = Probe()
    runner = toy_runner(tmp_path, TWHITEN if tunable else FWHITEN,
                        [hook, probe], max_iters=3)
    runner.train()
    assert hook.status == 'computed'
    assert probe.first['ready']
    backbone = runner.model.backbone
    # The first 8 images of the (unshuffled) data set, preprocessed by an
    # identity ImgDataPreprocessor.
    expected = manual_block0_whitening(backbone, toy_images(16)[:8], EPS)
    assert not torch.allclose(expected, torch.eye(32))
    assert_close_rel(probe.first['whitening'], expected, 1e-5)
    assert hook.results[0]['num_tokens'] == 8 * 16
    # The prompt tokens train in both variants.
    assert not torch.equal(probe.last['tokens'], probe.first['tokens'])
    in_optimizer = any(
        p is backbone.prompts['0'].whitening
        for group in runner.optim_wrapper.optimizer.param_groups
        for p in group['params'] if p.requires_grad)
    if tunable:
        assert probe.first['requires_grad'] and in_optimizer
        assert not torch.equal(probe.last['whitening'],
                               probe.first['whitening'])
    else:
        assert not probe.first['requires_grad'] and not in_optimizer
        assert torch.equal(probe.last['whitening'], probe.first['whitening'])


@pytest.mark.parametrize('sampler', ['InfiniteSampler', 'DefaultSampler'])
def test_hook_with_a_runner_given_a_built_dataloader(tmp_path, sampler):
    """A Runner given a DataLoader object (not its config): whitening is
    computed from the data set in order, the same as from the config's
    unshuffled loader, and training goes on to max_iters (with an
    InfiniteSampler it used to stop with StopIteration: the hook's pass
    closed the sampler's one generator)."""
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import DATA_SAMPLERS
    from mmengine.runner import Runner
    torch.manual_seed(0)
    model = BPTWhiteningToyModel(backbone=dict(prompt=dict(FWHITEN)))
    dataset = BPTWhiteningToyDataset(num_images=16)
    loader = DataLoader(dataset, batch_size=4, collate_fn=pseudo_collate,
                        sampler=DATA_SAMPLERS.get(sampler)(dataset,
                                                           shuffle=False))
    hook, probe = BPTWhiteningHook(num_images=8, eps=EPS), Probe()
    runner = Runner(
        model=model, work_dir=str(tmp_path), train_dataloader=loader,
        train_cfg=dict(by_epoch=False, max_iters=6),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.5)),
        custom_hooks=[hook, probe], log_level='WARNING',
        default_hooks=dict(checkpoint=dict(type='CheckpointHook',
                                           interval=1000)),
        experiment_name=f'built_{sampler}_{os.getpid()}_{time.time_ns()}')
    runner.train()
    assert runner.iter == 6 and hook.status == 'computed'
    expected = manual_block0_whitening(runner.model.backbone,
                                       toy_images(16)[:8], EPS)
    assert_close_rel(probe.first['whitening'], expected, 1e-5)


def test_resume_skips_computation_and_restores_bits(tmp_path):
    # No TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: bpt_mm's checkpoint loader reads
    # mmengine's training state (see tests/test_trainable_state.py).
    first = BPTWhiteningHook(num_images=8, eps=EPS)
    runner = toy_runner(tmp_path, FWHITEN, [first], max_iters=2,
                        checkpoint_interval=2)
    runner.train()
    assert first.status == 'computed'
    ckpt = torch.load(tmp_path / 'iter_2.pth', map_location='cpu',
                      weights_only=False)
    saved = ckpt['state_dict']['backbone.prompts.0.whitening']
    assert bool(ckpt['state_dict']['backbone.prompts.0.whitening_ready'])

    second, probe = BPTWhiteningHook(num_images=8, eps=EPS), Probe()
    # Another seed: without the checkpoint its prompts would differ.
    resumed = toy_runner(tmp_path, FWHITEN, [second, probe], max_iters=3,
                         resume=True, model_seed=1)
    resumed.train()
    assert second.status == 'restored' and second.results == {}
    assert torch.equal(probe.first['whitening'], saved)
    assert torch.equal(saved, first.results[0]['whitening'])


def test_hook_loads_whitening_file(tmp_path):
    computing = BPTWhiteningHook(num_images=8, eps=EPS)
    runner = toy_runner(tmp_path / 'a', FWHITEN, [computing], max_iters=1)
    runner.train()
    path = tmp_path / 'whitening.pth'
    save_whitening(path, computing.results, runner.model.backbone,
                   computing.options)

    loading, probe = BPTWhiteningHook(whitening_file=str(path)), Probe()
    runner = toy_runner(tmp_path / 'b', FWHITEN, [loading, probe],
                        max_iters=1)
    runner.train()
    assert loading.status == 'file'
    assert torch.equal(probe.first['whitening'],
                       computing.results[0]['whitening'])


def test_file_made_for_other_deep_prompts_is_said(tmp_path, monkeypatch):
    # Deep fWhiten file, loaded for deep whitening-initialised bilinear
    # prompts: blocks above the first saw other prompts when the file was
    # made, which the qkv fingerprint cannot tell.
    computing = BPTWhiteningHook(num_images=8, eps=EPS)
    runner = toy_runner(tmp_path / 'a', DEEP_PROMPT, [computing],
                        max_iters=1)
    runner.call_hook('before_train')
    path = tmp_path / 'deep.pth'
    save_whitening(path, computing.results, runner.model.backbone,
                   computing.options)

    bilinear = dict(type='BilinearPrompt', num_tokens=4, rank=4,
                    whitening_init=True, depth='deep')
    for prompt, said in ((bilinear, True), (DEEP_PROMPT, False)):
        loading = BPTWhiteningHook(whitening_file=str(path), eps=EPS)
        runner = toy_runner(tmp_path / str(said), prompt, [loading],
                            max_iters=1)
        warnings = []
        monkeypatch.setattr(runner.logger, 'warning', warnings.append)
        runner.call_hook('before_train')
        assert loading.status == 'file'
        other = [w for w in warnings if 'was computed for' in w]
        if said:
            assert len(other) == 1, warnings
            assert 'WhitenedPrompt' in other[0] and 'BilinearPrompt' in \
                other[0] and 'blocks [1, 2]' in other[0], other
        else:
            assert other == [], warnings


def test_training_without_hook_raises_not_ready(tmp_path):
    runner = toy_runner(tmp_path, FWHITEN, [], max_iters=1)
    with pytest.raises(WhiteningNotReadyError, match='BPTWhiteningHook'):
        runner.train()


def test_before_test_fills_only_missing_whitening(tmp_path):
    hook = BPTWhiteningHook(num_images=4, eps=EPS)
    runner = toy_runner(tmp_path, FWHITEN, [hook])
    prompt = runner.model.backbone.prompts['0']
    assert not bool(prompt.whitening_ready)
    runner.call_hook('before_test')  # builds cfg.train_dataloader
    assert hook.status == 'computed' and bool(prompt.whitening_ready)
    expected = manual_block0_whitening(runner.model.backbone,
                                       toy_images(16)[:4], EPS)
    assert_close_rel(prompt.whitening, expected, 1e-5)

    other = BPTWhiteningHook(num_images=4, eps=EPS)
    other.before_test(runner)  # present now: nothing to do
    assert other.status == 'restored'


def test_hook_without_whitening_prompts_does_nothing(tmp_path):
    hook = BPTWhiteningHook()
    runner = toy_runner(tmp_path, dict(type='BilinearPrompt', num_tokens=4,
                                       rank=4), [hook])
    basis = runner.model.backbone.prompts['0'].basis.detach().clone()
    hook.before_train(runner)
    assert hook.status == 'not_needed'
    assert torch.equal(runner.model.backbone.prompts['0'].basis, basis)


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_images=0), 'num_images'),
    (dict(num_images=True), 'num_images'),
    (dict(num_images=2.0), 'num_images'),
    (dict(source='norm2'), 'source'),
    (dict(tokens='prompts'), 'tokens'),
    (dict(statistic='mean'), 'statistic'),
    (dict(product='qq'), 'product'),
    (dict(eps=-1.0), 'eps'),
    (dict(bilinear_init='xavier'), 'bilinear_init'),
    (dict(whitening_file=3), 'whitening_file'),
])
def test_hook_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BPTWhiteningHook(**kwargs)


# ---------------------------------------------------------------------------
# collect_whitening on a bare backbone
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('options', [
    dict(eps=EPS),
    dict(eps=EPS, source='norm1', tokens='all', center=True),
], ids=['paper', 'norm1-all-centered'])
def test_deep_prompts_see_earlier_whitened_prompts(options):
    stats = WhiteningOptions(**options)
    images = toy_images(12)
    backbone = deep_backbone()
    reference = copy.deepcopy(backbone).eval()
    results = collect_whitening(backbone, images.split(5), stats,
                                num_images=12)
    assert sorted(results) == [0, 1, 2]

    def entering(model, block):
        with torch.no_grad():
            for i, tokens_in, _, _ in model.iter_blocks(images):
                if i == block:
                    break
            if options.get('tokens') != 'all':
                tokens_in = tokens_in[:, model.num_prefix_tokens:]
            if options.get('source') == 'norm1':
                tokens_in = model.blocks[block].norm1(tokens_in)
            return tokens_in

    # Blocks 1 and 2 of a model whose earlier prompts were never whitened.
    naive = {block: whitening_from_tokens(
        entering(reference, block), reference.blocks[block].attn.qkv.weight,
        stats)[0] for block in (1, 2)}
    for block in range(3):
        expected, _ = whitening_from_tokens(
            entering(reference, block),
            reference.blocks[block].attn.qkv.weight, stats)
        assert_close_rel(results[block]['whitening'], expected, 1e-5)
        assert torch.equal(backbone.prompts[str(block)].whitening,
                           results[block]['whitening'])
        reference.prompts[str(block)].set_whitening(expected)
    # The earlier prompts matter: ignoring them gives another W, by 100x
    # the tolerance of the comparison above.
    for block in (1, 2):
        w = results[block]['whitening']
        assert (naive[block] - w).abs().max() > 1e-3 * w.abs().max()
    # Eval/no-grad only for the collection: the mode is restored.
    assert backbone.training


def test_whitening_initialised_bilinear_basis(tmp_path):
    prompt = dict(type='BilinearPrompt', num_tokens=8, rank=8,
                  whitening_init=True)
    torch.manual_seed(0)
    backbone = small_vit(prompt=prompt)
    fresh = copy.deepcopy(backbone)
    xavier = backbone.prompts['0'].basis.detach().clone()
    stats = WhiteningOptions(eps=EPS)
    results = collect_whitening(backbone, toy_images(8).split(4), stats,
                                num_images=8, seed=5)
    w, basis = results[0]['whitening'], backbone.prompts['0'].basis
    assert bool(backbone.prompts['0'].whitening_ready)
    assert not torch.allclose(basis, xavier)
    # B = W C with orthonormal C: W^-1 B has orthonormal columns.
    c = torch.linalg.solve(w.to(F64), basis.detach().to(F64))
    torch.testing.assert_close(c.T @ c, torch.eye(8, dtype=F64), rtol=0,
                               atol=1e-4)
    expected = whitened_bilinear_basis(
        w, 8, 'random', generator=torch.Generator().manual_seed(5))
    assert torch.equal(basis, expected)
    # Through a file, the same B is rebuilt from W and the seed.
    path = tmp_path / 'w.pth'
    save_whitening(path, results, backbone, stats)
    apply_whitening(fresh, load_whitening(path, fresh), seed=5)
    assert torch.equal(fresh.prompts['0'].basis, basis)
    # A randomly initialised bilinear prompt needs nothing.
    plain = small_vit(prompt=dict(prompt, whitening_init=False))
    assert whitening_blocks(plain) == []
    assert collect_whitening(plain, toy_images(4).split(4), stats, 4) == {}


def test_non_finite_features_name_the_block():
    backbone = deep_backbone()
    images = toy_images(4)
    images[0, 0, 0, 0] = float('inf')
    with pytest.raises(ValueError, match='block 0'):
        collect_whitening(backbone, [images], WhiteningOptions(), 4)


# ---------------------------------------------------------------------------
# File
# ---------------------------------------------------------------------------
def _deep_file(tmp_path, name, **kwargs):
    torch.manual_seed(0)
    prompt = dict(type='WhitenedPrompt', num_tokens=4, depth='deep')
    prompt.update(kwargs.pop('prompt', {}))
    backbone = small_vit(prompt=prompt, **kwargs)
    stats = WhiteningOptions(eps=EPS)
    results = collect_whitening(backbone, toy_images(8).split(4), stats, 8)
    path = tmp_path / name
    save_whitening(path, results, backbone, stats)
    return path, results


def test_block_tokens_is_the_models_token_tap():
    # Shallow prompts sit between CLS and the patches; the tap gives the
    # patches (or CLS + patches) entering each block, never the prompts,
    # before or after the block's norm1, and runs no block above the last.
    torch.manual_seed(0)
    backbone = small_vit(prompt=dict(type='VPTPrompt', num_tokens=3)).eval()
    x = toy_images(2)
    with torch.no_grad():
        entering = {i: t for i, t, _, _ in backbone.iter_blocks(x)}
        patches = backbone.block_tokens(x, [2, 0])
        everything = backbone.block_tokens(x, [1], tokens='all')
        normed = backbone.block_tokens(x, [1], source='norm1')
    assert sorted(patches) == [0, 2]
    for block in (0, 2):
        assert torch.equal(patches[block], entering[block][:, 1 + 3:])
    assert torch.equal(everything[1], torch.cat(
        [entering[1][:, :1], entering[1][:, 1 + 3:]], dim=1))
    with torch.no_grad():
        want = backbone.blocks[1].norm1(entering[1][:, 1 + 3:])
    assert torch.equal(normed[1], want)
    ran = []
    handle = backbone.blocks[2].register_forward_pre_hook(
        lambda module, args: ran.append(2))
    with torch.no_grad():
        backbone.block_tokens(x, [1])
    handle.remove()
    assert ran == []
    assert backbone.block_tokens(x, []) == {}
    for blocks in ([3], [-1], [True]):
        with pytest.raises(ValueError, match='not block indices'):
            backbone.block_tokens(x, blocks)
    with pytest.raises(ValueError, match="`tokens` must be 'patch' or"):
        backbone.block_tokens(x, [0], tokens='cls')
    with pytest.raises(ValueError, match="`source`.*'norm2'"):
        backbone.block_tokens(x, [0], source='norm2')


def test_collect_decomposes_sigma_once_per_block(monkeypatch):
    # Deep BPT-bilinear ('random' C: no eigenvectors needed for B): one
    # eigendecomposition per block gives W, the condition number and the
    # effective rank, which equal those of three separate ones.
    torch.manual_seed(0)
    backbone = small_vit(prompt=dict(type='BilinearPrompt', num_tokens=4,
                                     rank=4, whitening_init=True,
                                     depth='deep'))
    calls = count_calls(monkeypatch, 'eigh', module=torch.linalg)
    results = collect_whitening(backbone, toy_images(8).split(4),
                                WhiteningOptions(eps=EPS), 8)
    assert sorted(results) == [0, 1, 2] and len(calls) == 3
    monkeypatch.undo()
    for block, result in results.items():
        w, cond, rank = previous_whitening(result['sigma'], EPS)
        assert torch.equal(result['whitening'], w), block
        assert result['condition_number'] == cond
        assert result['effective_rank'] == rank


def test_eigen_basis_reuses_the_one_decomposition_and_checks_nothing_again(
        monkeypatch):
    # bilinear_init='eigen': B takes the eigenvectors of the spectrum that
    # gave W (one eigh per block, not two), and rank / bilinear_init, checked
    # by the prompt's options and WhiteningOptions, are not checked again on
    # the way; B equals what the checked public function gives, bit for bit.
    import bpt_mm.whitening.linalg as linalg
    import bpt_mm.whitening.options as options_module
    torch.manual_seed(0)
    backbone = small_vit(prompt=dict(type='BilinearPrompt', num_tokens=4,
                                     rank=3, whitening_init=True,
                                     depth='deep'))
    eighs = count_calls(monkeypatch, 'eigh', module=torch.linalg)
    rank_checks = count_calls(monkeypatch, 'check_positive_int',
                              module=linalg)
    choice_checks = count_calls(monkeypatch, 'check_choice', module=linalg)
    # Which query-key product: checked where the options are built, not
    # again per block on the collector's way (qk_product, the body).
    product_checks = []
    check_choice = options_module.check_choice

    def counted_choice(value, allowed, arg):
        if allowed == options_module.QK_ORDERS:
            product_checks.append(arg)
        return check_choice(value, allowed, arg)

    monkeypatch.setattr(options_module, 'check_choice', counted_choice)
    results = collect_whitening(backbone, toy_images(8).split(4),
                                WhiteningOptions(eps=EPS,
                                                 bilinear_init='eigen'), 8)
    assert sorted(results) == [0, 1, 2] and len(eighs) == 3
    # The product is checked once, by WhiteningOptions; linalg checks
    # nothing on the way.
    assert rank_checks == [] and choice_checks == []
    assert product_checks == ['product']
    monkeypatch.undo()
    for block, result in results.items():
        expected = whitened_bilinear_basis(
            result['whitening'], 3, 'eigen', sigma=result['sigma'],
            generator=torch.Generator().manual_seed(block))
        assert torch.equal(result['basis'], expected), block
        assert torch.equal(backbone.prompts[str(block)].basis, expected)


@pytest.mark.parametrize('prompt, done', [
    (FWHITEN, 'whitening_ready'),
    (dict(type='SPTPrompt', num_tokens=4, depth='deep'), 'prototypes_ready'),
])
def test_hook_options_are_checked_once_on_the_way_to_the_tensors(
        tmp_path, monkeypatch, prompt, done):
    # The hook checks num_images, seed, tokens, source (and the prototype
    # options) when it is built; on the way to the prompts nothing checks
    # them again: the collectors' checked entry points and the model's
    # checked token tap are not called, only their bodies.
    import bpt_mm.whitening.collect as collect
    from bpt_mm.models import PromptedViT
    hook = BPTWhiteningHook(num_images=4, eps=EPS, tokens='all',
                            source='norm1', seed=3)
    runner = toy_runner(tmp_path, prompt, [hook])
    checks = [count_calls(monkeypatch, name, module=collect)
              for name in ('check_positive_int', 'check_seed')]

    def checked_tap(*args, **kwargs):
        raise AssertionError('block_tokens re-checks tokens/source')

    if done == 'whitening_ready':
        monkeypatch.setattr(PromptedViT, 'block_tokens', checked_tap)
    hook.before_train(runner)
    assert hook.status == 'computed'
    assert all(bool(getattr(p, done)) for p in
               runner.model.backbone.prompt_modules().values())
    assert checks == [[], []]


def test_hook_refuses_an_empty_training_set_by_name(tmp_path):
    # Before, the empty set surfaced as "`num_images` must be a positive
    # int, got 0", a value the user never gave.
    hook = BPTWhiteningHook(num_images=4, eps=EPS)
    runner = toy_runner(tmp_path, FWHITEN, [hook], num_images=0)
    with pytest.raises(ValueError, match='training set has no images'):
        hook.before_train(runner)


def test_eigen_basis_from_a_file_needs_only_the_eigenvectors():
    # Results read from a file: B's eigenvectors come from the stored Sigma,
    # which need not be whitenable with the hook's eps (a singular Sigma
    # and eps=0 are fine: no regulariser is involved in U).
    backbone = small_vit(prompt=dict(type='BilinearPrompt', num_tokens=4,
                                     rank=3, whitening_init=True))
    sigma = torch.diag(torch.arange(32, dtype=F64))  # singular
    w = torch.eye(32)
    applied = apply_whitening(backbone, {0: dict(whitening=w, sigma=sigma)},
                              WhiteningOptions(eps=0, bilinear_init='eigen'))
    assert applied == [0]
    expected = whitened_bilinear_basis(w, 3, 'eigen', sigma=sigma)
    assert torch.equal(backbone.prompts['0'].basis, expected)
    assert torch.equal(expected.abs().argmax(0), torch.tensor([31, 30, 29]))


def test_all_tokens_without_a_class_token_is_said():
    backbone = small_vit(prompt=dict(FWHITEN), class_token=False)
    with pytest.warns(UserWarning, match='has no class token'):
        without = collect_whitening(backbone, [toy_images(8)],
                                    WhiteningOptions(eps=EPS, tokens='all'),
                                    8)
    patches = collect_whitening(backbone, [toy_images(8)],
                                WhiteningOptions(eps=EPS), 8)
    assert torch.equal(without[0]['whitening'], patches[0]['whitening'])


def test_direct_collector_calls_still_check(tmp_path):
    backbone = small_vit(prompt=dict(FWHITEN))
    for call in (collect_whitening, collect_prototypes):
        with pytest.raises(ValueError, match='`num_images`.*got 0'):
            call(backbone, [toy_images(4)], num_images=0)
        with pytest.raises(ValueError, match="`seed` must be an int.*'1'"):
            call(backbone, [toy_images(4)], num_images=4, seed='1')
    # No batch at all: said so, not "call update() before second_moment()".
    with pytest.raises(ValueError, match='batches gave no image'):
        collect_whitening(backbone, [], num_images=4)
    spt = small_vit(prompt=dict(type='SPTPrompt', num_tokens=4))
    with pytest.raises(ValueError, match='batches gave no image'):
        collect_prototypes(spt, iter([]), num_images=4)


def test_file_round_trip_and_refusals(tmp_path):
    path, results = _deep_file(tmp_path, 'deep.pth')
    target = deep_backbone()  # same weights, whitening not computed
    loaded, info = load_whitening(path, target, return_info=True)
    assert info['statistics']['eps'] == EPS and info['num_images'] == 8
    assert info['layers'] == [0, 1, 2] and info['embed_dims'] == 32
    apply_whitening(target, loaded)
    for block in range(3):
        assert torch.equal(target.prompts[str(block)].whitening,
                           results[block]['whitening'])
        assert bool(target.prompts[str(block)].whitening_ready)

    other_d, _ = _deep_file(tmp_path, 'd16.pth',
                            arch=dict(embed_dims=16, num_layers=3,
                                      num_heads=2))
    with pytest.raises(ValueError, match=r"d16\.pth.*embed_dims=16"):
        load_whitening(other_d, deep_backbone())
    other_depth, _ = _deep_file(tmp_path, 'l4.pth',
                                arch=dict(embed_dims=32, num_layers=4,
                                          num_heads=2))
    with pytest.raises(ValueError, match='num_layers=4'):
        load_whitening(other_depth, deep_backbone())
    upper, _ = _deep_file(tmp_path, 'upper.pth',
                          prompt=dict(layers=[1, 2]))
    with pytest.raises(ValueError, match=r'upper\.pth.*blocks \[0\]'):
        load_whitening(upper, deep_backbone())
    # Other attention weights (another seed).
    torch.manual_seed(1)
    with pytest.raises(ValueError, match='other attention weights'):
        load_whitening(path, small_vit(prompt=dict(
            type='WhitenedPrompt', num_tokens=4, depth='deep')))
    # A matrix of the wrong shape.
    payload = torch.load(path, weights_only=True)
    payload['blocks'][1]['whitening'] = torch.zeros(32, 16)
    bad = tmp_path / 'bad.pth'
    torch.save(payload, bad)
    with pytest.raises(ValueError, match=r'bad\.pth.*block 1.*\(32, 32\)'):
        load_whitening(bad, deep_backbone())
    torch.save({'state_dict': {}}, tmp_path / 'ckpt.pth')
    with pytest.raises(ValueError, match='not a bpt_mm whitening file'):
        load_whitening(tmp_path / 'ckpt.pth', deep_backbone())


# ---------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------
def _whiten_my_half_then_fail_on_rank_1(rank: int, world: int,
                                        out_dir: str) -> None:
    """Each rank whitens its half of the images; then rank 1 fails."""
    stats = WhiteningOptions(**DIST_OPTIONS)
    images = toy_images(16)
    half = len(images) // world
    mine = images[rank * half:(rank + 1) * half]
    results = collect_whitening(deep_backbone(), mine.split(3), stats,
                                num_images=half)
    torch.save(results, f'{out_dir}/rank{rank}.pt')

    bad = mine.clone()
    if rank == 1:
        bad[1, 0, 0, 0] = float('nan')
    start = time.monotonic()
    try:
        collect_whitening(deep_backbone(), bad.split(3), stats,
                          num_images=half)
        message = None
    except RuntimeError as exc:
        message = str(exc)
    torch.save({'message': message, 'seconds': time.monotonic() - start},
               f'{out_dir}/error{rank}.pt')


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('dist')
    run_two_processes(_whiten_my_half_then_fail_on_rank_1, str(out),
                      'whitening', seconds=90)
    return out


def test_two_processes_match_one_and_agree(two_process_run):
    ranks = [torch.load(two_process_run / f'rank{r}.pt', weights_only=False)
             for r in range(2)]
    single = collect_whitening(deep_backbone(), toy_images(16).split(3),
                               WhiteningOptions(**DIST_OPTIONS),
                               num_images=16)
    for block in range(3):
        got = [r[block] for r in ranks]
        assert got[0]['num_tokens'] == got[1]['num_tokens'] == 16 * 16
        assert got[0]['num_images'] == got[1]['num_images'] == 16
        for key in ('whitening', 'sigma'):
            assert torch.equal(got[0][key], got[1][key]), (block, key)
        assert got[0]['condition_number'] == got[1]['condition_number']
        assert_close_rel(got[0]['whitening'], single[block]['whitening'],
                         1e-6)


def test_failing_rank_stops_every_rank(two_process_run):
    for rank in range(2):
        report = torch.load(two_process_run / f'error{rank}.pt',
                            weights_only=False)
        assert report['message'] is not None, f'rank {rank} did not raise'
        assert 'rank(s) [1]' in report['message']
        assert 'block 0' in report['message']
        assert report['seconds'] < 20  # well below the 60 s pg timeout


# ---------------------------------------------------------------------------
# tools/compute_whitening.py
# ---------------------------------------------------------------------------
def test_compute_whitening_help_names_each_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool('compute_whitening').parse_args(['--help'])
    assert exit_info.value.code == 0
    # argparse wraps the help: compare it with its whitespace collapsed.
    text = ' '.join(capsys.readouterr().out.split())
    defaults = WhiteningOptions()
    for flag, value in [('--eps', defaults.eps), ('--source', defaults.source),
                        ('--tokens', defaults.tokens),
                        ('--no-center', defaults.center),
                        ('--statistic', defaults.statistic),
                        ('--product', defaults.product),
                        ('--bilinear-init', defaults.bilinear_init),
                        ('--seed', 0), ('--num-images', 100)]:
        after_flag = text.split(f' {flag} ', 1)[1].split(' --', 1)[0]
        assert f'default: the hook entry, else {value!r}' in after_flag, \
            (flag, after_flag)


def run_compute_whitening(tmp_path, prompt: dict, hook: str,
                          args: list, num_images: int = 16,
                          sampler: str = 'DefaultSampler',
                          extra: str = ''):
    """``tools/compute_whitening.py`` on a toy config (toy model with
    ``prompt``, ``num_images`` toy images, the hook entry ``hook``; the
    config's ``extra`` lines), with ``args``; returns the finished process.
    """
    config = tmp_path / 'toy_config.py'
    config.write_text(
        "custom_imports = dict(imports=['whitening_toy'], "
        "allow_failed_imports=False)\n" + extra +
        f"model = dict(type='BPTWhiteningToyModel', backbone=dict("
        f"prompt={prompt!r}))\n"
        "train_dataloader = dict(batch_size=4, num_workers=0, "
        "dataset=dict(type='BPTWhiteningToyDataset', "
        f"num_images={num_images}), "
        f"sampler=dict(type={sampler!r}, shuffle=False))\n"
        f"custom_hooks = [{hook}]\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, ROOT]),
               OMP_NUM_THREADS='1')
    return subprocess.run(
        [sys.executable, 'tools/compute_whitening.py', str(config), *args,
         '--device', 'cpu'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_compute_whitening_tool(tmp_path):
    prompt = dict(type='WhitenedPrompt', num_tokens=4, depth='deep',
                  layers=[1, 2])
    torch.manual_seed(3)
    model = BPTWhiteningToyModel(backbone=dict(prompt=prompt))
    ckpt = tmp_path / 'toy.pth'
    torch.save({'state_dict': model.state_dict()}, ckpt)
    out = tmp_path / 'out' / 'whitening.pth'
    proc = run_compute_whitening(
        tmp_path, prompt,
        f"dict(type='BPTWhiteningHook', num_images=4, eps={EPS}, "
        "source='norm1')",
        ['--checkpoint', str(ckpt), '--num-images', '8', '--out', str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'block' in proc.stdout and 'saved to' in proc.stdout

    # The config's hook entry set eps/source, the flag num_images.
    stats = WhiteningOptions(eps=EPS, source='norm1')
    expected = collect_whitening(copy.deepcopy(model.backbone),
                                 toy_images(16)[:8].split(4), stats, 8)
    loaded, info = load_whitening(out, model.backbone, return_info=True)
    assert info['statistics']['source'] == 'norm1'
    assert info['statistics']['eps'] == EPS and info['num_images'] == 8
    assert sorted(loaded) == [1, 2]
    for block in (1, 2):
        assert_close_rel(loaded[block]['whitening'],
                         expected[block]['whitening'], 1e-6)


def test_hook_and_tool_take_each_of_fewer_images_once_by_one_rule(
        tmp_path):
    # The rule lived twice (the hook and the tool, with different words);
    # now both call images_to_use.
    three = DataLoader(list(range(3)))
    used, note = images_to_use(three, 8, 'whitening')
    assert used == 3
    assert '`num_images` is 8' in note and 'only 3 distinct' in note
    assert images_to_use(three, 3, 'whitening') == (3, None)
    assert images_to_use(object(), 8, 'whitening') == (8, None)  # no length
    with pytest.raises(ValueError, match='training set has no images'):
        images_to_use(DataLoader([]), 8, 'whitening')

    prompt = dict(type='WhitenedPrompt', num_tokens=4)
    out = tmp_path / 'whitening.pth'
    proc = run_compute_whitening(
        tmp_path, prompt, f"dict(type='BPTWhiteningHook', eps={EPS})",
        ['--num-images', '40', '--out', str(out)],
        sampler='InfiniteSampler')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _, expected = images_to_use(DataLoader(list(range(16))), 40,
                                'whitening')
    assert f'compute_whitening: warning: {expected}' in proc.stderr, \
        proc.stderr
    assert 'from 16 images' in proc.stdout, proc.stdout


def test_compute_whitening_tool_builds_the_model_training_starts_from(
        tmp_path):
    # Without a checkpoint, a random backbone (the tiny configs) must get
    # the weights a Runner gives it (the config's `randomness` seeds them
    # before the model is built): otherwise the training run refuses the
    # file by its fingerprint.
    from mmengine.runner import set_random_seed
    prompt = dict(type='WhitenedPrompt', num_tokens=4)
    out = tmp_path / 'whitening.pth'
    proc = run_compute_whitening(
        tmp_path, prompt, f"dict(type='BPTWhiteningHook', eps={EPS})",
        ['--num-images', '8', '--out', str(out)], num_images=8,
        extra='randomness = dict(seed=5)\n')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    set_random_seed(5)  # as Runner.__init__ does before build_model
    model = BPTWhiteningToyModel(backbone=dict(prompt=prompt))
    model.init_weights()
    loaded = load_whitening(out, model.backbone)  # fingerprint accepted
    assert sorted(loaded) == [0]


def test_images_of_different_sizes_in_one_segmentation_batch():
    # mmseg's random resize + 512 crop can batch 512x512 beside 453x453, and
    # its preprocessor refuses to stack them: the hook splits the batch.
    from mmseg.registry import MODELS as SEG_MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    from bpt_mm.engine.whitening_hook import preprocessed_images
    register_all_modules()
    pre = SEG_MODELS.build(dict(type='SegDataPreProcessor', mean=[0.] * 3,
                                std=[1.] * 3, bgr_to_rgb=True))

    class Segmentor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.data_preprocessor = pre

    images = [torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8),
              torch.randint(0, 255, (3, 48, 56), dtype=torch.uint8)]
    batch = dict(inputs=images, data_samples=[SegDataSample(),
                                              SegDataSample()])
    with pytest.raises(AssertionError):
        pre(batch, False)  # what the hook used to call
    out = list(preprocessed_images(Segmentor(), [batch]))
    assert [tuple(x.shape) for x in out] == [(1, 3, 64, 64), (1, 3, 48, 56)]
    # RGB from BGR, as the model sees them
    assert torch.equal(out[1][0], images[1].flip(0).float())
