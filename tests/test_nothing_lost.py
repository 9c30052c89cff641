"""Nothing lost, nothing silent: user data and trained weights survive
every refusal byte for byte, a run with a non-finite loss stops before it
saves, and whitening reports what it really saw.

The refusals of single bad inputs are in ``tests/test_bad_inputs.py``; this
file holds the cases that need a training run or compare files.
"""
import os
import os.path as osp
import re
import warnings

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner
from mmengine.runner.checkpoint import load_state_dict

from bpt_mm.engine import BPTWhiteningHook, FiniteCheckHook
from bpt_mm.launch import set_finite_check
from bpt_mm.testing.tiny_data import ensure_tiny_data
from bpt_mm.whitening.accumulators import RankDeficientWarning
from bpt_mm.whitening.collect import collect_whitening
from bpt_mm.whitening.options import WhiteningOptions
from helpers import small_vit
from whitening_toy import toy_images, toy_runner

pytestmark = pytest.mark.usefixtures('one_thread')

BILINEAR = dict(type='BilinearPrompt', num_tokens=4, rank=4,
                whitening_init=True)


def read_tree(root: str) -> dict:
    """Relative path -> bytes of every file under ``root``."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = osp.join(dirpath, name)
            with open(path, 'rb') as f:
                out[osp.relpath(path, root)] = f.read()
    return out


def small_runner(tmp: str, prompt: dict, max_iters: int = 1, hooks=(),
                 **kwargs) -> Runner:
    """The toy Runner on 4 images, 2 a step, SGD at 0.1, with mmengine's
    default hooks and random seed unless ``kwargs`` say otherwise."""
    settings = dict(num_images=4, batch_size=2, lr=0.1, seed=None,
                    checkpoint_interval=None, log_interval=None)
    settings.update(kwargs)
    return toy_runner(tmp, prompt, hooks, max_iters=max_iters, **settings)


# ---------------------------------------------------------------- item 1
def test_tiny_data_never_replaces_a_folder_it_did_not_make(tmp_path):
    out = str(tmp_path / 'data')
    # A user's COCO: no generator manifest.
    user_coco = osp.join(out, 'coco', 'annotations')
    os.makedirs(user_coco)
    with open(osp.join(user_coco, 'instances_train2017.json'), 'w') as f:
        f.write('{"images": [], "note": "my real data"}')
    before = read_tree(out)
    for force in (False, True):
        with pytest.raises(ValueError) as info:
            ensure_tiny_data(out, num_train=1, num_val=1, force=force)
        message = str(info.value)
        assert osp.join(out, 'coco') in message, message
        assert 'MANIFEST.json' in message and '--out' in message, message
        assert read_tree(out) == before
    assert sorted(os.listdir(out)) == ['coco']  # nothing added beside it

    # A file where a set folder would go is left alone too.
    other = str(tmp_path / 'other')
    os.makedirs(other)
    with open(osp.join(other, 'ade20k'), 'w') as f:
        f.write('not a folder')
    with pytest.raises(ValueError, match=r"ade20k' exists and is not a "):
        ensure_tiny_data(other, num_train=1, num_val=1, force=True)
    with open(osp.join(other, 'ade20k')) as f:
        assert f.read() == 'not a folder'


def test_tiny_data_never_removes_files_added_to_its_folder(tmp_path):
    """A generated set into which a user put a file of their own is not
    replaced (``--force``, or a regeneration because a listed file went
    missing): the folder would be removed with the user's file in it."""
    out = str(tmp_path / 'data')
    ensure_tiny_data(out, num_train=1, num_val=1)
    mine = osp.join(out, 'coco', 'annotations', 'my_relabelled.json')
    with open(mine, 'w') as f:
        f.write('{"note": "hours of my work"}')
    # A listed file removed too, so a plain call would regenerate the set.
    os.remove(osp.join(out, 'ade20k', 'MANIFEST.json'))
    os.makedirs(osp.join(out, 'ade20k', 'extra'))
    with open(osp.join(out, 'ade20k', 'extra', 'a.txt'), 'w') as f:
        f.write('mine')
    before = read_tree(out)
    for force in (False, True):
        with pytest.raises(ValueError) as info:
            ensure_tiny_data(out, num_train=1, num_val=1, force=force,
                             seed=1)
        message = str(info.value)
        assert osp.join(out, 'coco') in message, message
        assert 'annotations/my_relabelled.json' in message, message
        assert read_tree(out) == before
    os.remove(mine)
    # coco is replaceable again; ade20k lost its manifest, so it is now
    # refused as foreign data.
    with pytest.raises(ValueError, match=r"ade20k' exists and has no "):
        ensure_tiny_data(out, num_train=1, num_val=1, force=True)
    with open(osp.join(out, 'ade20k', 'extra', 'a.txt')) as f:
        assert f.read() == 'mine'


# ---------------------------------------------------------------- item 2
def _trained_without_whitening(tmp: str) -> str:
    """A checkpoint of prompts trained with allow_identity_whitening=True:
    ``whitening_ready`` False, a basis B changed by training."""
    runner = small_runner(tmp, dict(BILINEAR, allow_identity_whitening=True),
                          max_iters=2,
                          default_hooks=dict(checkpoint=dict(
                              type='CheckpointHook', interval=2,
                              by_epoch=False)))
    runner.train()
    path = osp.join(tmp, 'iter_2.pth')
    assert osp.isfile(path)
    return path


def test_whitening_never_overwrites_a_trained_projection(tmp_path):
    path = _trained_without_whitening(str(tmp_path / 'first'))
    with open(path, 'rb') as f:
        before = f.read()
    state = torch.load(path, weights_only=False)['state_dict']
    assert not state['backbone.prompts.0.whitening_ready']
    trained_basis = state['backbone.prompts.0.basis']

    # Resumed (and tested) with a config that whitens: refused by name.
    for resume in (True, False):
        runner = small_runner(str(tmp_path / f'again_{resume}'), BILINEAR,
                              max_iters=3, load_from=path, resume=resume,
                              hooks=[dict(type='BPTWhiteningHook',
                                          num_images=4)])
        with pytest.raises(RuntimeError) as info:
            runner.train()
        message = str(info.value)
        assert 'blocks [0]' in message and '`basis`' in message, message
        assert 'allow_identity_whitening=True' in message, message
        assert path in message, message
        # The trained basis is still in the model, and the file untouched.
        assert torch.equal(runner.model.backbone.prompts['0'].basis,
                           trained_basis)
    with open(path, 'rb') as f:
        assert f.read() == before


def test_spt_prototypes_never_overwrite_trained_prompt_tokens(tmp_path):
    # VPT prompts trained for two iterations, then an SPT config loads them.
    tmp = str(tmp_path / 'vpt')
    small_runner(tmp, dict(type='VPTPrompt', num_tokens=4), max_iters=2,
                 default_hooks=dict(checkpoint=dict(
                     type='CheckpointHook', interval=2, by_epoch=False))
                 ).train()
    path = osp.join(tmp, 'iter_2.pth')
    with open(path, 'rb') as f:
        before = f.read()
    trained = torch.load(path, weights_only=True)[
        'state_dict']['backbone.prompts.0.tokens']
    runner = small_runner(str(tmp_path / 'spt'),
                          dict(type='SPTPrompt', num_tokens=4), max_iters=3,
                          load_from=path,
                          hooks=[dict(type='BPTWhiteningHook', num_images=4)])
    with pytest.raises(RuntimeError) as info:
        runner.train()
    message = str(info.value)
    assert 'blocks [0]' in message and 'prototypes_ready' in message
    assert path in message and 'allow_identity_whitening=True' in message
    assert torch.equal(runner.model.backbone.prompts['0'].tokens, trained)
    with open(path, 'rb') as f:
        assert f.read() == before


# ---------------------------------------------------------------- item 5
def test_whitening_state_follows_what_was_really_loaded():
    torch.manual_seed(0)
    source = small_vit(prompt=dict(BILINEAR, rank=8))
    source.prompts['0'].set_basis(torch.randn(32, 8))
    assert source.prompts['0'].is_whitened
    target = small_vit(prompt=dict(BILINEAR, rank=4))
    # mmengine's non-strict load skips B of another shape ...
    load_state_dict(target, source.state_dict(), strict=False)
    # ... so its whitening_ready=True must not mark the random B whitened.
    assert not target.prompts['0'].is_whitened
    assert not target.prompts['0'].projection_loaded_unwhitened
    # Same shapes: the whitening comes with the basis.
    same = small_vit(prompt=dict(BILINEAR, rank=8))
    load_state_dict(same, source.state_dict(), strict=False)
    assert same.prompts['0'].is_whitened
    assert torch.equal(same.prompts['0'].basis, source.prompts['0'].basis)


# ---------------------------------------------------------------- item 3
@HOOKS.register_module(force=True)
class PoisonWeightsHook(Hook):
    """Writes NaN into the head's bias after iteration ``at`` (1-based),
    before (``priority``) or after CheckpointHook."""

    def __init__(self, at: int, priority: str = 'LOWEST') -> None:
        self.at = at
        self.priority = priority

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if runner.iter + 1 == self.at:
            with torch.no_grad():
                runner.model.head.bias[0] = float('nan')


def _poisoned_run(tmp: str, priority: str) -> Runner:
    return small_runner(
        tmp, dict(type='VPTPrompt', num_tokens=4), max_iters=6,
        hooks=[dict(type='FiniteCheckHook'),
               dict(type='PoisonWeightsHook', at=2, priority=priority)],
        default_hooks=dict(checkpoint=dict(
            type='CheckpointHook', interval=1, by_epoch=False,
            max_keep_ckpts=1)))


def test_non_finite_loss_stops_before_any_checkpoint(tmp_path):
    work = str(tmp_path)
    runner = _poisoned_run(work, 'LOWEST')  # after iteration 2's save
    with pytest.raises(FloatingPointError) as info:
        runner.train()
    message = str(info.value)
    # Iteration 3 computes with the NaN bias: its loss is NaN.
    assert 'iteration 3' in message and "loss=nan" in message, message
    # Iteration 2's checkpoint (finite) is the one kept: nothing of
    # iteration 3 was saved, and the rotation did not remove it.
    files = sorted(f for f in os.listdir(work) if f.endswith('.pth'))
    assert files == ['iter_2.pth'], files
    state = torch.load(osp.join(work, 'iter_2.pth'),
                       weights_only=False)['state_dict']
    assert all(torch.isfinite(v).all() for v in state.values()
               if v.is_floating_point())
    with open(osp.join(work, 'last_checkpoint')) as f:
        assert f.read().strip().endswith('iter_2.pth')


def test_non_finite_weights_stop_before_the_save(tmp_path):
    work = str(tmp_path)
    # NaN written by a hook after iteration 2's step (as a non-finite
    # gradient would): its loss was finite, its weights are not.
    runner = _poisoned_run(work, 'NORMAL')
    with pytest.raises(FloatingPointError) as info:
        runner.train()
    message = str(info.value)
    assert 'iteration 2' in message and 'loss is finite' in message, message
    assert "'head.bias'" in message, message
    # Stopped before CheckpointHook removed iter_1.pth to make room.
    files = sorted(f for f in os.listdir(work) if f.endswith('.pth'))
    assert files == ['iter_1.pth'], files


@pytest.mark.parametrize('by_epoch', [False, True])
def test_without_weight_checks_a_save_still_never_rotates_away(tmp_path,
                                                               by_epoch):
    """``FiniteCheckHook(check_weights=False)`` skips the per-iteration
    weight check, but weights turned non-finite with a finite loss (a
    non-finite gradient) must still stop the run before CheckpointHook
    removes the only kept checkpoint (``max_keep_ckpts=1``) to make room
    for a save that is then refused; iteration- and epoch-based."""
    work = str(tmp_path)
    # 4 images, batch 2: 2 iterations an epoch; the NaN comes after the
    # step of iteration 2 (iteration-based) or 4 (the end of epoch 2).
    runner = small_runner(
        work, dict(type='VPTPrompt', num_tokens=4), max_iters=6,
        train_cfg=dict(by_epoch=True, max_epochs=3) if by_epoch else None,
        hooks=[dict(type='FiniteCheckHook', check_weights=False),
               dict(type='PoisonWeightsHook', at=4 if by_epoch else 2,
                    priority='NORMAL')],
        default_hooks=dict(checkpoint=dict(
            type='CheckpointHook', interval=1, by_epoch=by_epoch,
            max_keep_ckpts=1)))
    with pytest.raises(FloatingPointError) as info:
        runner.train()
    message = str(info.value)
    expected = 'the end of epoch 2 (iteration 4)' if by_epoch else \
        'iteration 2'
    assert f'stopped at {expected}' in message, message
    assert "'head.bias'" in message, message
    files = sorted(f for f in os.listdir(work) if f.endswith('.pth'))
    assert files == (['epoch_1.pth'] if by_epoch else ['iter_1.pth']), files


def test_a_checkpoint_of_non_finite_weights_is_never_written(tmp_path):
    runner = small_runner(str(tmp_path), dict(type='VPTPrompt', num_tokens=4),
                          hooks=[dict(type='FiniteCheckHook')],
                          default_hooks=dict(checkpoint=None))
    runner.train()
    with torch.no_grad():
        runner.model.head.weight[1, 2] = float('inf')
    with pytest.raises(FloatingPointError) as info:
        runner.save_checkpoint(str(tmp_path), 'manual.pth')
    assert "refusing to save" in str(info.value)
    assert "'head.weight'" in str(info.value)
    assert not osp.exists(osp.join(str(tmp_path), 'manual.pth'))


def test_finite_check_is_on_unless_switched_off():
    from mmengine.config import Config
    cfg = Config(dict(custom_hooks=[dict(type='RandomStateHook')]))
    set_finite_check(cfg)
    assert [h['type'] for h in cfg.custom_hooks] == [
        'RandomStateHook', 'FiniteCheckHook']
    set_finite_check(cfg)  # no second one
    assert len(cfg.custom_hooks) == 2
    set_finite_check(cfg, enabled=False)  # --allow-non-finite
    assert [h['type'] for h in cfg.custom_hooks] == ['RandomStateHook']
    with pytest.raises(TypeError, match='check_weights'):
        FiniteCheckHook(check_weights='yes')


# ---------------------------------------------------------------- item 7
def test_whitening_counts_distinct_images(tmp_path):
    hook = BPTWhiteningHook(num_images=200)
    runner = small_runner(str(tmp_path), dict(type='WhitenedPrompt',
                                              num_tokens=4),
                          num_images=4, sampler='InfiniteSampler',
                          hooks=[hook])
    runner.train()  # 4 images x 16 tokens = 64 >= d = 32 tokens
    assert hook.status == 'computed'
    assert {r['num_images'] for r in hook.results.values()} == {4}


def test_rank_deficient_sigma_is_reported():
    torch.manual_seed(0)
    backbone = small_vit(prompt=dict(type='WhitenedPrompt',
                                     num_tokens=4))
    # 16 black 16x16 images: 64 tokens, but only 4 distinct ones (one per
    # patch position), so Sigma has rank 4 of d = 32.
    black = torch.zeros(16, 3, 16, 16)
    with pytest.warns(RankDeficientWarning) as caught:
        results = collect_whitening(backbone, black.split(4),
                                    WhiteningOptions(), 16)
    message = str(caught[0].message)
    rank = results[0]['effective_rank']
    assert rank <= 4, rank
    assert 'block 0' in message and f'effective rank {rank} of d=32' in \
        message, message
    # Varied images: full rank, no warning.
    with warnings.catch_warnings():
        warnings.simplefilter('error', RankDeficientWarning)
        results = collect_whitening(backbone, toy_images(8).split(4),
                                    WhiteningOptions(), 8)
    assert results[0]['effective_rank'] > 16


# ----------------------------------------------- item 3, as a user runs it
def test_train_tool_exits_non_zero_on_a_diverging_run(tiny_workspace,
                                                      tmp_path):
    from helpers import TINY, run, tool
    work = tmp_path / 'work'
    # lr 1e6 (AdamW): the weights blow up after the first step. The tiny
    # Mask R-CNN's FiniteCheckHook comes from its config.
    text = run(tool('train.py', TINY['mask_rcnn'], '--work-dir', work,
                    '--cfg-options', 'optim_wrapper.optimizer.lr=1e6',
                    'optim_wrapper.clip_grad=None', 'train_cfg.max_iters=6',
                    'train_cfg.val_interval=100',
                    'default_hooks.checkpoint.interval=1',
                    'default_hooks.checkpoint.max_keep_ckpts=1'),
               tiny_workspace, expect=1)
    found = re.search(r'FloatingPointError: FiniteCheckHook: training '
                      r'stopped at iteration (\d+): (.*)', text)
    assert found, text[-3000:]
    stopped = int(found.group(1))
    assert 'non-finite' in found.group(2), found.group(2)
    # The checkpoint kept is the last finite one, of the iteration before.
    files = sorted(f for f in os.listdir(work) if f.endswith('.pth'))
    assert files == ([f'iter_{stopped - 1}.pth'] if stopped > 1 else []), \
        (stopped, files)
    for name in files:
        state = torch.load(work / name, weights_only=False)['state_dict']
        assert all(torch.isfinite(v).all() for v in state.values()
                   if v.is_floating_point()), name
