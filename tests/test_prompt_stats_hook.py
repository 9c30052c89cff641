"""PromptStatsHook in a plain mmengine Runner on the toy model of
``tests/whitening_toy.py`` (PromptedViT d=32, 3 blocks; 16 images of 32x32,
16 patches each)."""
import glob
import json
import uuid

import pytest
import torch

from bpt_mm.analysis.burstiness import kurtosis
from bpt_mm.engine import BPTWhiteningHook, PromptStatsHook
from bpt_mm.engine.prompt_stats_hook import CHECKPOINT_KEY
from whitening_toy import toy_images, toy_runner

EPS = 1e-3
# deep BPT-tWhiten in blocks 1 and 2, W trained in both
TWHITEN_DEEP = dict(type='WhitenedPrompt', num_tokens=4, tunable=True,
                    depth='deep', layers=[1, 2])
F64 = torch.float64


# W's gradients are ~1e-7 against entries up to ~1e3 (the toy features are
# small, so their whitening is large): at the prompts' rate a step would not
# move it in float32.
OPTIM_WRAPPER = dict(optimizer=dict(type='SGD', lr=0.5),
                     paramwise_cfg=dict(custom_keys={
                         '.whitening': dict(lr_mult=1e5)}))


def make_runner(work_dir, hooks, max_iters=4, log_interval=2,
                prompt=TWHITEN_DEEP, **kwargs):
    """The toy Runner with ``hooks``, W trained, scalars logged every
    ``log_interval`` iterations to a visualiser of its own."""
    return toy_runner(
        work_dir, prompt, hooks, max_iters=max_iters,
        log_interval=log_interval, optim_wrapper=OPTIM_WRAPPER,
        visualizer=dict(type='Visualizer', name=uuid.uuid4().hex,
                        vis_backends=[dict(type='LocalVisBackend')]),
        **kwargs)


def test_scalars_match_a_hand_computation_and_reach_the_visualiser(
        tmp_path):
    whitening = BPTWhiteningHook(num_images=8, eps=EPS)
    stats = PromptStatsHook(interval=2)
    runner = make_runner(tmp_path, [whitening, stats], max_iters=4)
    runner.train()
    backbone = runner.model.backbone
    keys = {f'{name}/block{b}' for b in (1, 2) for name in (
        'prompt_norm', 'prompt_logit_kurtosis', 'whitening_drift')}
    assert set(stats.last) == keys

    # The last logged iteration is the 4th: images 12-15 of the unshuffled
    # set, after that iteration's optimizer step (= the final weights).
    images = toy_images(16)[12:16]
    prompt = backbone.prompts['1']
    with torch.no_grad():
        tokens, _ = backbone._embed(images)
        tokens = backbone.blocks[0](tokens)  # block 0 has no prompt
        x = tokens[:, 1:].reshape(-1, 32).to(F64)  # patches entering block 1
        p = (prompt.tokens @ prompt.whitening.T).to(F64)
        w = backbone.blocks[1].attn.qkv.weight.to(F64)
        logits = p @ (w[:32].T @ w[32:64]) @ x.T
        w0 = whitening.results[1]['whitening'].to(F64)
        drift = (prompt.whitening.to(F64) - w0).norm() / w0.norm()
    assert stats.last['prompt_norm/block1'] == pytest.approx(
        float(p.norm()), rel=1e-5)
    assert stats.last['prompt_logit_kurtosis/block1'] == pytest.approx(
        kurtosis(logits), rel=1e-4)
    assert float(drift) > 0
    assert stats.last['whitening_drift/block1'] == pytest.approx(
        float(drift), rel=1e-4)

    # through the message hub to the visualiser backend, at iterations 2, 4
    hub = runner.message_hub.get_scalar('train/prompt_norm/block1')
    assert len(hub.data[0]) == 2
    assert hub.current() == stats.last['prompt_norm/block1']
    files = glob.glob(str(tmp_path / '**' / 'vis_data' / 'scalars.json'),
                      recursive=True)
    assert len(files) == 1
    lines = [json.loads(line) for line in open(files[0])]
    assert [line['step'] for line in lines] == [2, 4]
    assert keys <= set(lines[-1])
    assert lines[-1]['prompt_logit_kurtosis/block2'] == pytest.approx(
        stats.last['prompt_logit_kurtosis/block2'])
    # the capturing pre-hook exists only during logged iterations
    assert not backbone._forward_pre_hooks


def test_training_is_the_same_with_and_without_the_hook(tmp_path):
    finals = []
    for hooks in ([], [PromptStatsHook(interval=1)]):
        runner = make_runner(tmp_path / str(len(hooks)),
                             [BPTWhiteningHook(num_images=8, eps=EPS),
                              *hooks], max_iters=3)
        runner.train()
        finals.append({k: v.clone() for k, v in
                       runner.model.state_dict().items()})
        has = 'train/prompt_norm/block1' in runner.message_hub.log_scalars
        assert has == bool(hooks)  # off unless listed
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key


def test_resume_measures_drift_from_the_first_initial_whitening(tmp_path):
    first = PromptStatsHook(interval=1)
    whitening = BPTWhiteningHook(num_images=8, eps=EPS)
    make_runner(tmp_path, [whitening, first], max_iters=2,
                checkpoint_interval=2).train()
    ckpt = torch.load(tmp_path / 'iter_2.pth', map_location='cpu',
                      weights_only=False)
    assert sorted(ckpt[CHECKPOINT_KEY]['initial_whitening']) == ['1', '2']
    w0 = whitening.results[1]['whitening']
    assert torch.equal(first.initial_whitening[1], w0)

    second = PromptStatsHook(interval=1)
    runner = make_runner(tmp_path, [BPTWhiteningHook(num_images=8, eps=EPS),
                                    second], max_iters=3, resume=True)
    runner.train()
    assert torch.equal(second.initial_whitening[1], w0)
    w = runner.model.backbone.prompts['1'].whitening.detach().to(F64)
    assert second.last['whitening_drift/block1'] == pytest.approx(
        float((w - w0.to(F64)).norm() / w0.to(F64).norm()), rel=1e-4)


def test_no_drift_without_a_trained_whitening(tmp_path):
    stats = PromptStatsHook(interval=1)
    make_runner(tmp_path, [stats], max_iters=1,
                prompt=dict(type='BilinearPrompt', num_tokens=4,
                            rank=4)).train()
    assert set(stats.last) == {'prompt_norm/block0',
                               'prompt_logit_kurtosis/block0'}


@pytest.mark.parametrize('kwargs, match', [
    (dict(interval=0), 'interval'), (dict(interval=True), 'interval'),
    (dict(source='x'), 'source'), (dict(product='x'), 'product')])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptStatsHook(**kwargs)
