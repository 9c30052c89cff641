"""SPT prompts: prototypes (bpt_mm/whitening/prototypes.py), their
collection from a backbone (``collect_prototypes``), the hook, two
processes, resume, bad options, the configs' counts and the tiny SPT config
end to end.

The toy backbone of ``tests/whitening_toy.py``: d = 32, 3 blocks, 32x32
images with 8x8 patches (16 patch tokens per image).
"""
import os.path as osp
import re

import pytest
import torch

from bpt_mm.engine import BPTWhiteningHook
from bpt_mm.launch import check_whitening_source
from bpt_mm.models import SPTPrompt, WhiteningNotReadyError
from bpt_mm.analysis.param_budget import budget_row, variant_backbone
from bpt_mm.whitening.collect import collect_prototypes, prototype_blocks
from bpt_mm.whitening.prototypes import (TokenReservoir, canonical_rows,
                                         compute_prototypes,
                                         kmeans_prototypes)
from helpers import ROOT, SHORT, last_metrics, run, small_vit, tool
from whitening_toy import run_two_processes, toy_images, toy_runner

SHALLOW = dict(type='SPTPrompt', num_tokens=4)
DEEP_KMEANS = dict(type='SPTPrompt', num_tokens=4, depth='deep',
                   init='kmeans')

pytestmark = pytest.mark.usefixtures('one_thread')


def clusters(num: int = 5, per: int = 60, dim: int = 16, seed: int = 0):
    """``num`` tight Gaussian clusters (std 0.05) around centres of norm
    ~10·sqrt(dim), rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(num, dim, generator=g)
    rows = torch.cat([c + 0.05 * torch.randn(per, dim, generator=g)
                      for c in centres])
    return centres, rows[torch.randperm(len(rows), generator=g)]


def is_row_of(prototypes, rows):
    """For each prototype, whether it equals some row of ``rows``."""
    return [bool((rows == p).all(1).any()) for p in prototypes]


def spt_backbone(prompt, seed=0):
    torch.manual_seed(seed)
    backbone = small_vit(prompt=dict(prompt))
    # timm's init leaves attention ~1e-3 of the residual: scale it so that
    # earlier deep prompts really change later blocks' tokens.
    with torch.no_grad():
        for block in backbone.blocks:
            block.attn.proj.weight.mul_(10)
    return backbone


# ---------------------------------------------------------------------------
# Prototypes of a token set
# ---------------------------------------------------------------------------
def test_kmeans_recovers_known_clusters():
    centres, rows = clusters()
    got = compute_prototypes(rows, 5, 'kmeans', seed=3)
    distance = torch.cdist(got.double(), centres.double())
    nearest = distance.argmin(1)
    # one prototype per cluster, each at its cluster's mean (0.05 noise
    # over 60 points: ~0.03 off the centre in 16 dimensions)
    assert sorted(nearest.tolist()) == list(range(5))
    assert float(distance.min(1).values.max()) < 0.1
    # and the same bits from the same seed, whatever the row order
    again = compute_prototypes(rows.flip(0), 5, 'kmeans', seed=3)
    assert torch.equal(got, again)


def test_kmeans_more_clusters_than_distinct_points_still_gives_m():
    # k-means itself copes (repeated centres) ...
    rows = torch.cat([torch.zeros(6, 3), torch.ones(6, 3)])
    got = kmeans_prototypes(rows, 4, torch.Generator().manual_seed(0))
    assert got.shape == (4, 3) and bool(torch.isfinite(got).all())
    assert {tuple(r) for r in got.tolist()} == {(0., 0., 0.), (1., 1., 1.)}
    # ... but repeated prompts are refused (test_fewer_distinct_tokens_...)
    with pytest.raises(ValueError, match='only 2 distinct'):
        compute_prototypes(rows, 4, 'kmeans', seed=0)


@pytest.mark.parametrize('init', ['sample', 'kmeans'])
def test_fewer_distinct_tokens_than_prompts_refused_by_name(init):
    two = torch.cat([torch.zeros(6, 3), torch.ones(6, 3)])
    with pytest.raises(ValueError, match=(
            rf"block 3: 4 SPT prototypes by init='{init}' would repeat rows: "
            r'the 12 token rows hold only 2 distinct one\(s\), fewer than '
            r'`prompt.num_tokens`=4\. Use more or other images '
            r"\(`num_images`\), fewer prompts \(`prompt.num_tokens`\) or "
            r"init='mean_pool'")):
        compute_prototypes(two, 4, init, seed=0, name='block 3')
    # uniform images: every row the same, and mean_pool is no way out
    with pytest.raises(ValueError, match=r'only 1 distinct .*uniform images'
                       ) as info:
        compute_prototypes(torch.ones(12, 3), 2, init, seed=0)
    assert 'mean_pool' not in str(info.value)
    # as many distinct rows as prompts is enough
    got = compute_prototypes(two, 2, init, seed=0)
    assert {tuple(r) for r in got.tolist()} == {(0., 0., 0.), (1., 1., 1.)}


def test_pooled_prototypes_from_few_distinct_tokens_only_if_they_differ():
    two = torch.cat([torch.zeros(50, 2), torch.ones(50, 2)])
    # 4 random groups of 25 rows: other mixtures, other means
    mean = compute_prototypes(two, 4, 'mean_pool', seed=0)
    assert len({tuple(r) for r in mean.tolist()}) == 4
    # but each group of 50 holds both rows: the same maximum twice
    with pytest.raises(ValueError, match=(
            r"tokens: init='max_pool' gave only 1 different SPT "
            r'prototype\(s\) of `prompt.num_tokens`=2 \(the 100 token rows '
            r'hold 2 distinct one\(s\)\)\. Use more or other images')):
        compute_prototypes(torch.cat([torch.tensor([[1., 0.], [0., 1.]])
                                      .repeat(50, 1)]), 2, 'max_pool',
                           seed=0)
    for init in ('mean_pool', 'max_pool'):
        with pytest.raises(ValueError, match=r'gave only 1 different .*'
                           r'hold 1 distinct .*uniform images'):
            compute_prototypes(torch.ones(12, 3), 2, init, seed=0)


def test_sample_draws_distinct_rows_seeded_and_order_free():
    _, rows = clusters()
    got = compute_prototypes(rows, 7, 'sample', seed=0)
    assert all(is_row_of(got, rows))
    assert len({tuple(r) for r in got.tolist()}) == 7
    assert torch.equal(got, compute_prototypes(rows.flip(0), 7, 'sample',
                                               seed=0))
    assert not torch.equal(got, compute_prototypes(rows, 7, 'sample',
                                                   seed=1))
    # distinct rows: the first 7 of a seeded shuffle of the sorted rows
    first = torch.randperm(len(rows), generator=torch.Generator()
                           .manual_seed(0))[:7]
    assert torch.equal(got, canonical_rows(rows)[first])


def test_sample_passes_over_repeated_rows():
    # one row 100 times and two others once: a plain draw of 3 rows would
    # almost always repeat the first
    rows = torch.cat([torch.zeros(100, 2), torch.tensor([[1., 0.],
                                                         [0., 1.]])])
    for seed in range(5):
        got = compute_prototypes(rows, 3, 'sample', seed=seed)
        assert {tuple(r) for r in got.tolist()} == \
            {(0., 0.), (1., 0.), (0., 1.)}


def test_pooled_prototypes_partition_the_rows():
    _, rows = clusters(per=20)  # 100 rows: 10 groups of 10
    mean = compute_prototypes(rows, 10, 'mean_pool', seed=0)
    torch.testing.assert_close(mean.double().mean(0),
                               rows.double().mean(0), rtol=0, atol=1e-5)
    maxed = compute_prototypes(rows, 10, 'max_pool', seed=0)
    assert torch.equal(maxed.amax(0), rows.amax(0))
    assert bool((maxed <= rows.amax(0)).all())
    # each max is attained by some row, channel by channel
    assert all(bool((rows[:, c] == maxed[0, c]).any()) for c in range(16))


def test_reservoir_keeps_everything_until_full_then_a_uniform_sample():
    rows = torch.arange(40.).unsqueeze(1)
    small = TokenReservoir(100, 1, seed=0)
    for part in rows.split(7):
        small.update(part)
    assert torch.equal(small.rows, rows) and small.num_seen == 40
    # Over many seeds each of 40 rows is kept with probability 10/40.
    kept = torch.zeros(40)
    trials = 400
    for seed in range(trials):
        reservoir = TokenReservoir(10, 1, seed=seed)
        for part in rows.split(7):
            reservoir.update(part)
        assert reservoir.rows.shape == (10, 1)
        assert len(set(reservoir.rows.flatten().tolist())) == 10
        kept[reservoir.rows.flatten().long()] += 1
    rate = kept / trials
    # binomial(400, 0.25): std 0.022; 0.25 +- 0.11 is five std
    assert float((rate - 0.25).abs().max()) < 0.11, rate
    # the first and the last rows alike (no bias towards early rows)
    assert abs(float(rate[:10].mean() - rate[-10:].mean())) < 0.06


def test_canonical_rows_is_order_free_and_keeps_duplicates():
    rows = torch.tensor([[1., 2.], [0., 5.], [1., 2.], [0., 1.]])
    out = canonical_rows(rows)
    assert torch.equal(out, torch.tensor([[0., 1.], [0., 5.], [1., 2.],
                                          [1., 2.]]))
    assert torch.equal(canonical_rows(rows.flip(0)), out)


# ---------------------------------------------------------------------------
# Prototypes of a backbone
# ---------------------------------------------------------------------------
def test_shallow_sample_draws_patch_embeddings_before_position():
    backbone = spt_backbone(SHALLOW)
    images = toy_images(8)
    results = collect_prototypes(backbone, images.split(3), num_images=8)
    assert list(results) == [0]
    r = results[0]
    assert (r['source'], r['init'], r['num_images'], r['num_tokens'],
            r['num_kept']) == ('patch_embed', 'sample', 8, 8 * 16, 8 * 16)
    prompt = backbone.prompts['0']
    assert bool(prompt.prototypes_ready)
    assert torch.equal(prompt.tokens.detach(), r['prototypes'])
    with torch.no_grad():  # in the same batches, for the same bits
        embedded = torch.cat([backbone.patch_embed(x).flatten(2).transpose(
            1, 2).reshape(-1, 32) for x in images.split(3)])
        positioned = torch.cat([backbone._embed(x)[0][:, 1:].reshape(-1, 32)
                                for x in images.split(3)])
    assert all(is_row_of(r['prototypes'], embedded))
    assert not any(is_row_of(r['prototypes'], positioned))


def test_deep_kmeans_uses_each_block_input_with_earlier_prompts_in_place():
    backbone = spt_backbone(DEEP_KMEANS)
    images = toy_images(8)
    results = collect_prototypes(backbone, images.split(4), num_images=8)
    assert sorted(results) == [0, 1, 2]
    for block in range(3):
        assert results[block]['source'] == 'block_input'
        with torch.no_grad():  # the prompts now in place, as in training
            tokens = torch.cat([backbone.block_tokens(x, [block])[block]
                                for x in images.split(4)])
        want = compute_prototypes(tokens.reshape(-1, 32), 4, 'kmeans',
                                  seed=block)
        torch.testing.assert_close(results[block]['prototypes'], want,
                                   rtol=1e-5, atol=1e-6)
    # block 2's tokens do depend on the prompts of blocks 0 and 1
    fresh = spt_backbone(DEEP_KMEANS).eval()  # prompts not filled: eval
    with torch.no_grad():
        before = fresh.block_tokens(images, [2])[2]
        after = backbone.block_tokens(images, [2])[2]
    assert not torch.allclose(before, after, atol=1e-4)


def test_bounded_tokens_and_too_few_tokens_named():
    backbone = spt_backbone(dict(SHALLOW, init='kmeans'))
    results = collect_prototypes(backbone, toy_images(8).split(4),
                                 num_images=8, max_tokens=20)
    assert results[0]['num_tokens'] == 128 and results[0]['num_kept'] == 20
    many = spt_backbone(dict(type='SPTPrompt', num_tokens=40))
    with pytest.raises(ValueError, match=r'block 0: 40 SPT prototypes need '
                       r'at least as many tokens; 32 were seen in 2 images '
                       r'and 32 kept.*`num_images`.*`prototype_tokens`.*'
                       r'`prompt.num_tokens`'):
        collect_prototypes(many, toy_images(2).split(1), num_images=2)
    assert not bool(many.prompts['0'].prototypes_ready)


@pytest.mark.parametrize('init', ['sample', 'kmeans', 'mean_pool',
                                  'max_pool'])
def test_uniform_images_give_no_repeated_prompts(init):
    uniform = torch.full((4, 3, 32, 32), 0.5)
    shallow = spt_backbone(dict(SHALLOW, init=init))
    # the patch embeddings of uniform images are all one row
    with pytest.raises(ValueError, match=r'block 0: .*`prompt.num_tokens`=4'
                       r'.*uniform images\?.*`num_images`'):
        collect_prototypes(shallow, uniform.split(2), num_images=4)
    assert not bool(shallow.prompts['0'].prototypes_ready)
    # the tokens entering a block carry the position embedding: 16 distinct
    # rows per image, enough for 4 different prompts
    deep = spt_backbone(dict(DEEP_KMEANS, init=init))
    results = collect_prototypes(deep, uniform.split(2), num_images=4)
    for r in results.values():
        assert len({tuple(p) for p in r['prototypes'].tolist()}) == 4


# ---------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------
def _prototypes_of_my_half(rank: int, world: int, out_dir: str) -> None:
    """Each rank gives its half of the images, in the single process's
    batches."""
    images = toy_images(16)
    mine = images[rank * 8:(rank + 1) * 8]
    out = {}
    for name, prompt in (('shallow', SHALLOW), ('deep', DEEP_KMEANS)):
        results = collect_prototypes(spt_backbone(prompt), mine.split(4),
                                     num_images=8)
        for block, r in results.items():
            out[f'{name}.{block}'] = r['prototypes']
            out[f'{name}.{block}.counts'] = torch.tensor(
                [r['num_images'], r['num_tokens'], r['num_kept']])
    # Every other image, one per batch, as a DistributedSampler deals
    # them: the sorted token set is the same as one process's.
    dealt = collect_prototypes(spt_backbone(SHALLOW),
                               images[rank::world].split(1),
                               num_images=8)
    out['dealt'] = dealt[0]['prototypes']
    # A reservoir smaller than the tokens: the ranks still agree.
    small = collect_prototypes(spt_backbone(SHALLOW), mine.split(4),
                               num_images=8, max_tokens=50)
    out['small'] = small[0]['prototypes']
    torch.save(out, f'{out_dir}/rank{rank}.pt')
    # Uniform images: rank 0 refuses, and every rank stops with its reason.
    try:
        collect_prototypes(spt_backbone(SHALLOW),
                           torch.full_like(mine, 0.5).split(4), num_images=8)
        message = 'no error'
    except RuntimeError as exc:
        message = str(exc)
    with open(f'{out_dir}/uniform{rank}.txt', 'w') as f:
        f.write(message)
    # A NaN in rank 1's tokens: every rank stops, naming the block.
    bad = mine.clone()
    if rank == 1:
        bad[2, 0, 5, 5] = float('nan')
    try:
        collect_prototypes(spt_backbone(SHALLOW), bad.split(4),
                           num_images=8)
        message = 'no error'
    except RuntimeError as exc:
        message = str(exc)
    with open(f'{out_dir}/nan{rank}.txt', 'w') as f:
        f.write(message)


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('spt_dist')
    run_two_processes(_prototypes_of_my_half, str(out), 'SPT', seconds=120)
    return out


def test_two_processes_equal_one_and_agree(two_process_run):
    ranks = [torch.load(two_process_run / f'rank{r}.pt', weights_only=True)
             for r in range(2)]
    assert sorted(ranks[0]) == sorted(ranks[1])
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    images = toy_images(16)
    for name, prompt in (('shallow', SHALLOW), ('deep', DEEP_KMEANS)):
        single = collect_prototypes(spt_backbone(prompt), images.split(4),
                                    num_images=16)
        for block, r in single.items():
            assert torch.equal(ranks[0][f'{name}.{block}'],
                               r['prototypes']), (name, block)
            assert ranks[0][f'{name}.{block}.counts'].tolist() == \
                [16, 256, 256]
    in_order = collect_prototypes(spt_backbone(SHALLOW), images.split(1),
                                  num_images=16)
    assert torch.equal(ranks[0]['dealt'], in_order[0]['prototypes'])
    # max_tokens=50 over two processes: 25 rows each, 50 gathered
    assert ranks[0]['small'].shape == (4, 32)


def test_two_processes_refuse_uniform_images_alike(two_process_run):
    for rank in range(2):
        message = (two_process_run / f'uniform{rank}.txt').read_text()
        assert re.search(r'rank\(s\) \[0\] while computing the SPT '
                         r'prototypes of block 0 .*block 0: 4 SPT prototypes '
                         r"by init='sample' would repeat rows: the 256 token "
                         r'rows hold only 1 distinct', message), \
            (rank, message)


def test_two_processes_refuse_non_finite_tokens_alike(two_process_run):
    for rank in range(2):
        message = (two_process_run / f'nan{rank}.txt').read_text()
        assert re.search(r'rank\(s\) \[1\] while collecting the SPT tokens '
                         r'of block 0.*block 0: non-finite token values',
                         message), (rank, message)


@pytest.mark.parametrize('init', ['sample', 'kmeans', 'mean_pool',
                                  'max_pool'])
@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_prototypes_of_non_finite_rows_are_refused_by_name(init, value):
    # Before, 'sample' passed over them unseen, 'kmeans' failed in torch
    # ("probability tensor contains either inf, nan ...") and the pools
    # said "prototypes are not finite", none naming the block.
    rows = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    rows[3, 1] = value
    with pytest.raises(ValueError, match=(
            r'^block 2: the token rows have 1 non-finite value\(s\) out of '
            r'80 \(shape \(20, 4\)\)')):
        compute_prototypes(rows, 4, init, seed=0, name='block 2')


# ---------------------------------------------------------------------------
# The hook: before training, resume, bad options
# ---------------------------------------------------------------------------
def test_hook_refuses_uniform_images_and_trains_nothing(tmp_path):
    hook = BPTWhiteningHook(num_images=8)
    runner = toy_runner(tmp_path, SHALLOW, [hook], checkpoint_interval=1,
                        dataset=dict(type='BPTWhiteningToyDataset',
                                     num_images=8, fill=0.5))
    with pytest.raises(ValueError, match=(
            r"block 0: 4 SPT prototypes by init='sample' would repeat rows: "
            r'the 128 token rows hold only 1 distinct one\(s\), fewer than '
            r'`prompt.num_tokens`=4 \(every token the same: uniform '
            r'images\?\)\. Use more or other images \(`num_images`\), '
            r'fewer prompts \(`prompt.num_tokens`\)$')):
        runner.train()
    assert not bool(runner.model.backbone.prompts['0'].prototypes_ready)
    assert runner.iter == 0 and not list(tmp_path.glob('**/iter_*.pth'))


def test_hook_fills_prototypes_and_resume_does_not_recompute(
        tmp_path, monkeypatch):
    first = BPTWhiteningHook(num_images=8)
    runner = toy_runner(tmp_path, SHALLOW, [first], max_iters=2,
                        checkpoint_interval=2)
    runner.train()
    assert first.status == 'computed'
    assert first.results[0]['num_images'] == 8
    computed = first.results[0]['prototypes']
    ckpt = torch.load(tmp_path / 'iter_2.pth', map_location='cpu',
                      weights_only=False)
    state = ckpt['state_dict']
    assert bool(state['backbone.prompts.0.prototypes_ready'])
    trained = state['backbone.prompts.0.tokens']
    assert not torch.equal(trained, computed)  # the prompts trained

    import bpt_mm.engine.whitening_hook as hook_module
    calls = []
    monkeypatch.setattr(hook_module, 'run_prototypes',
                        lambda *a, **k: calls.append(1))
    second = BPTWhiteningHook(num_images=8)
    resumed = toy_runner(tmp_path, SHALLOW, [second], max_iters=3,
                         resume=True, model_seed=1)
    resumed.train()
    assert second.status == 'restored' and not calls
    assert bool(resumed.model.backbone.prompts['0'].prototypes_ready)


def test_options_the_prompts_do_not_use_are_named(tmp_path, monkeypatch):
    spt = BPTWhiteningHook(num_images=4, eps=1e-3, bilinear_init='eigen')
    runner = toy_runner(tmp_path / 'spt', SHALLOW, [spt], max_iters=1)
    warnings = []
    monkeypatch.setattr(runner.logger, 'warning', warnings.append)
    runner.call_hook('before_train')
    assert spt.status == 'computed'
    assert any("['bilinear_init', 'eps'] are set but not used" in w
               and 'SPT prototypes' in w for w in warnings), warnings

    whitening = BPTWhiteningHook(num_images=8, eps=1e-3, kmeans_iters=9)
    runner = toy_runner(tmp_path / 'w', dict(type='WhitenedPrompt',
                                             num_tokens=4),
                        [whitening], max_iters=1)
    warnings = []
    monkeypatch.setattr(runner.logger, 'warning', warnings.append)
    runner.call_hook('before_train')
    assert whitening.status == 'computed'
    assert any("['kmeans_iters'] are set but not used" in w
               for w in warnings), warnings
    assert not any('eps' in w for w in warnings), warnings


def test_training_without_hook_refused_naming_prototypes(tmp_path):
    runner = toy_runner(tmp_path, SHALLOW, [], max_iters=1)
    with pytest.raises(WhiteningNotReadyError,
                       match='prototypes of training tokens.*'
                             'BPTWhiteningHook'):
        runner.train()
    from mmengine.config import Config
    cfg = Config(dict(model=dict(backbone=dict(type='PromptedViT',
                                               prompt=dict(SHALLOW)))))
    with pytest.raises(ValueError, match="'SPTPrompt', which needs "
                       'prototypes of training tokens'):
        check_whitening_source(cfg)


def test_whitening_file_refused_for_spt(tmp_path):
    hook = BPTWhiteningHook(whitening_file=str(tmp_path / 'w.pth'))
    runner = toy_runner(tmp_path, SHALLOW, [hook], max_iters=1)
    with pytest.raises(ValueError, match='`whitening_file`.*SPTPrompt.*'
                       'prototypes'):
        runner.train()


@pytest.mark.parametrize('options, pattern', [
    (dict(init='k-means'), r'`prompt.init` must be one of'),
    (dict(init=None), r'`prompt.init` must be one of'),
    (dict(source='patch'), r'`prompt.source` must be None'),
    (dict(inits='kmeans'), r'unknown key `prompt.inits` for SPTPrompt '
                           r"\(did you mean 'init'\?\)"),
    (dict(rank=4), r'unknown key `prompt.rank` for SPTPrompt'),
])
def test_bad_prompt_options_refused_by_name(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        small_vit(prompt=dict(SHALLOW, **options))


@pytest.mark.parametrize('options, pattern', [
    (dict(prototype_tokens=0), '`prototype_tokens` must be a positive'),
    (dict(prototype_tokens=1.5e4), '`prototype_tokens` must be a positive'),
    (dict(kmeans_iters=True), '`kmeans_iters` must be a positive'),
    (dict(kmeans_iter=5), "did you mean 'kmeans_iters'"),
])
def test_bad_hook_options_refused_by_name(options, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        BPTWhiteningHook(**options)


def test_bad_collection_arguments_refused_by_name():
    backbone = spt_backbone(SHALLOW)
    for kwargs, pattern in ((dict(max_tokens=0), '`max_tokens`'),
                            (dict(kmeans_iters=0), '`kmeans_iters`'),
                            (dict(blocks=[1]), r'`blocks` \[1\] have no '
                                               'SPT prompt')):
        with pytest.raises(ValueError, match=pattern):
            collect_prototypes(backbone, toy_images(2).split(1), **kwargs)
    with pytest.raises(ValueError, match='SPT prototypes must have shape '
                       r'\(4, 32\), got \(3, 32\)'):
        backbone.prompts['0'].set_prototypes(torch.zeros(3, 32))


# ---------------------------------------------------------------------------
# Counts and the tiny config
# ---------------------------------------------------------------------------
def test_spt_has_vpt_trainable_count():
    assert budget_row(variant_backbone('spt'))['total'] == 76_800
    prompt = SPTPrompt(num_tokens=100, embed_dims=768)
    assert sum(p.numel() for p in prompt.parameters()) == 76_800
    assert 'prototypes_ready' in prompt.state_dict()
    assert prototype_blocks(small_vit(prompt=dict(
        DEEP_KMEANS, layers=[1, 2]))) == [1, 2]


def test_tiny_spt_config_trains_and_evaluates(tiny_workspace, tmp_path):
    config = osp.join(ROOT, 'configs', 'tiny', 'mask_rcnn_spt_tiny.py')
    work = tmp_path / 'work'
    text = run(tool('train.py', config, '--work-dir', work,
                    '--cfg-options', *SHORT), tiny_workspace)
    assert 'SPT prototypes per block' in text
    val = last_metrics(text, 'val')
    for key in ('coco/bbox_mAP', 'coco/segm_mAP'):
        assert 0.0 <= val[key] <= 100.0, key
    state = torch.load(work / 'iter_4.pth', map_location='cpu',
                       weights_only=False)
    assert bool(state['state_dict']['backbone.prompts.0.prototypes_ready'])


def test_before_test_fills_missing_prototypes_only(tmp_path):
    hook = BPTWhiteningHook(num_images=4)
    runner = toy_runner(tmp_path, SHALLOW, [hook])
    prompt = runner.model.backbone.prompts['0']
    runner.call_hook('before_test')  # builds cfg.train_dataloader
    assert hook.status == 'computed' and bool(prompt.prototypes_ready)
    assert hook.results[0]['num_images'] == 4
    filled = prompt.tokens.detach().clone()
    # A full checkpoint: the backbone has no pretrained file to complete a
    # trainable-only one from (that is refused, see test_frozen_state.py).
    checkpoint = {k: v.clone() for k, v in runner.model.state_dict().items()}
    # tools/test.py with a checkpoint that holds them: nothing recomputed
    again = BPTWhiteningHook(num_images=4, seed=5)
    runner = toy_runner(tmp_path / 'b', SHALLOW, [again])
    runner.model.load_state_dict(checkpoint)
    runner.call_hook('before_test')
    assert again.status == 'restored'
    assert torch.equal(runner.model.backbone.prompts['0'].tokens, filled)


def test_docstring_examples():
    import doctest

    from bpt_mm.whitening import prototypes
    from bpt_mm.models import prompts
    for module in (prototypes, prompts):
        result = doctest.testmod(module, verbose=False)
        assert result.attempted > 0 and result.failed == 0, module.__name__
