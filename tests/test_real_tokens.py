"""Only real image tokens enter the statistics: padding patches are dropped."""
import re

import pytest
import torch

from bpt_mm.analysis.burstiness import kurtosis
from bpt_mm.analysis.token_statistics import analyse_backbone
from bpt_mm.engine.prompt_stats_hook import prompt_statistics
from bpt_mm.models import PromptedViT
from bpt_mm.whitening.real_tokens import ImageBatch, real_patch_mask
from bpt_mm.whitening.collect import collect_prototypes, collect_whitening
from bpt_mm.whitening.linalg import query_key_product
from bpt_mm.whitening.options import WhiteningOptions
from helpers import small_vit

PATCH = 8


def whitened_vit(seed: int = 0) -> PromptedViT:
    torch.manual_seed(seed)
    model = small_vit(
        dict(type='WhitenedPrompt', num_tokens=2, tunable=False),
        arch=dict(embed_dims=16, num_layers=2, num_heads=2, mlp_ratio=2.0),
        patch_size=PATCH)
    with torch.no_grad():
        # Zero position embeddings: resampling them to the padded canvas
        # would change the real tokens themselves (as in any ViTDet-style
        # detector); that is the model, not the statistic under test.
        model.pos_embed.zero_()
    return model.eval()


def padded(images, canvas):
    """Images top-left on a zero canvas, as mmdet/mmseg preprocessors pad."""
    out = torch.zeros(len(images), 3, *canvas)
    for i, image in enumerate(images):
        out[i, :, :image.shape[-2], :image.shape[-1]] = image
    return ImageBatch(out, tuple(tuple(im.shape[-2:]) for im in images))


def test_patch_mask_keeps_patches_that_overlap_the_image():
    mask = real_patch_mask([(17, 8), (8, 24)], (4, 3), PATCH, 2)
    assert mask.view(2, 4, 3).tolist() == [
        [[True, False, False]] * 3 + [[False, False, False]],
        [[True, True, True]] + [[False, False, False]] * 3]
    assert real_patch_mask(None, (2, 2), PATCH, 3).all()
    with pytest.raises(ValueError, match='2 entries for a batch of 3'):
        real_patch_mask([(8, 8), (8, 8)], (2, 2), PATCH, 3)


@pytest.mark.parametrize('tokens', ['patch', 'all'])
def test_whitening_of_padded_batch_equals_unpadded(tokens, one_thread):
    torch.manual_seed(1)
    # Sizes that are not patch multiples: the partial patches are real.
    images = [torch.randn(3, 28, 20), torch.randn(3, 20, 28),
              torch.randn(3, 28, 20), torch.randn(3, 20, 28)]
    statistics = WhiteningOptions(tokens=tokens, eps=1e-6)

    unpadded_model = whitened_vit()
    unpadded = collect_whitening(
        unpadded_model, [im.unsqueeze(0) for im in images], statistics,
        num_images=4, allow_few_tokens=True)[0]
    # One batch on a canvas twice the size of the largest image.
    padded_model = whitened_vit()
    batch = padded(images, (56, 56))
    result = collect_whitening(padded_model, [batch], statistics,
                               num_images=4, allow_few_tokens=True)[0]

    per_image = 4 * 3 + (tokens == 'all')  # 28x20 px -> 4x3 patches
    assert unpadded['num_tokens'] == result['num_tokens'] == 4 * per_image
    assert unpadded['num_dropped_tokens'] == 0
    assert result['num_dropped_tokens'] == 4 * (7 * 7 - 12)
    torch.testing.assert_close(result['sigma'], unpadded['sigma'],
                               rtol=1e-6, atol=1e-6 * float(
                                   unpadded['sigma'].abs().max()))
    torch.testing.assert_close(result['whitening'], unpadded['whitening'],
                               rtol=1e-6, atol=1e-6 * float(
                                   unpadded['whitening'].abs().max()))

    # Without the sizes every patch of the canvas counts: another matrix.
    naive = collect_whitening(whitened_vit(), [batch.images], statistics,
                              num_images=4, allow_few_tokens=True)[0]
    assert naive['num_tokens'] == 4 * (49 + (tokens == 'all'))
    assert not torch.allclose(naive['sigma'], unpadded['sigma'], rtol=1e-3)


def test_authors_statistic_warns_about_padding_once_per_block(one_thread):
    # It warned once per padded batch: many lines over 100 images.
    torch.manual_seed(2)
    batches = [padded([torch.randn(3, 24, 32), torch.randn(3, 32, 24)],
                      (32, 32)) for _ in range(3)]
    with pytest.warns(UserWarning) as caught:
        collect_whitening(whitened_vit(), batches,
                          WhiteningOptions(statistic='authors', eps=1e-3),
                          num_images=6, allow_few_tokens=True)
    padding = [str(w.message) for w in caught
               if 'padding patch tokens' in str(w.message)]
    # 6 images on a 4x4 grid, each with one row or column of padding.
    assert padding == [
        "block 0: statistic='authors' averages every token position over "
        "the images, so 24 padding patch tokens of these 6 images are in "
        "it; use statistic='paper' to leave them out"], padding


@pytest.mark.parametrize('depth,init', [('shallow', 'sample'),
                                        ('deep', 'kmeans')])
def test_spt_prototypes_of_padded_batch_equal_unpadded(depth, init,
                                                       one_thread):
    """SPT prototypes are drawn from real image tokens only: a padded batch
    gives the prototypes of the unpadded images, bit for bit."""
    torch.manual_seed(4)
    images = [torch.randn(3, 28, 20), torch.randn(3, 20, 28)] * 2

    def spt_vit():
        torch.manual_seed(0)
        model = small_vit(
            dict(type='SPTPrompt', num_tokens=6, depth=depth, init=init),
            arch=dict(embed_dims=16, num_layers=2, num_heads=2,
                      mlp_ratio=2.0),
            patch_size=PATCH)
        with torch.no_grad():
            model.pos_embed.zero_()  # as in whitened_vit()
        return model.eval()

    unpadded = collect_prototypes(spt_vit(), [im.unsqueeze(0)
                                              for im in images],
                                  num_images=4)
    batch = padded(images, (56, 56))
    result = collect_prototypes(spt_vit(), [batch], num_images=4)
    naive = collect_prototypes(spt_vit(), [batch.images], num_images=4)
    for block, expected in unpadded.items():
        assert result[block]['num_tokens'] == expected['num_tokens'] == 48
        # Without the sizes, the 4 * 37 padding patches are candidates.
        assert naive[block]['num_tokens'] == 4 * 49
    # Block 0's tokens do not depend on the canvas; above it, real tokens
    # attend to the padding (the model, not the rule under test).
    assert torch.equal(result[0]['prototypes'], unpadded[0]['prototypes'])
    assert not torch.equal(naive[0]['prototypes'], unpadded[0]['prototypes'])


def test_burstiness_and_prompt_statistics_drop_padding(one_thread):
    torch.manual_seed(2)
    images = [torch.randn(3, 24, 16), torch.randn(3, 16, 24)] * 2
    batch = padded(images, (48, 48))
    model = whitened_vit()

    results = analyse_backbone(model, [batch], [0], num_images=4,
                               options=WhiteningOptions(eps=1e-3))
    assert results[0]['num_tokens'] == 4 * 6
    assert results[0]['num_dropped_tokens'] == 4 * (36 - 6)

    # The prompt-logit kurtosis of the padded batch is that of the logits
    # against the images' own tokens, each image run alone.
    stats = prompt_statistics(model, batch.images, {},
                              img_shapes=batch.img_shapes)
    prompt = model.prompts['0']().detach()
    product = query_key_product(model.blocks[0].attn.qkv.weight.detach())
    with torch.no_grad():
        rows = torch.cat([model.block_tokens(im.unsqueeze(0), [0])[0][0]
                          for im in images])
    assert rows.shape[0] == 4 * 6
    assert stats['prompt_logit_kurtosis/block0'] == pytest.approx(
        kurtosis(prompt @ product @ rows.T), rel=1e-5)
    naive = prompt_statistics(model, batch.images, {})
    assert naive['prompt_logit_kurtosis/block0'] != pytest.approx(
        stats['prompt_logit_kurtosis/block0'], rel=1e-3)


def test_prompt_stats_hook_takes_img_shape_from_the_batch(one_thread):
    import logging
    from types import SimpleNamespace

    from mmengine.logging import MessageHub

    from bpt_mm.engine import PromptStatsHook
    torch.manual_seed(3)
    images = [torch.randn(3, 24, 16), torch.randn(3, 16, 24)] * 2
    batch = padded(images, (48, 48))
    model = whitened_vit()
    runner = SimpleNamespace(
        iter=0, model=model, logger=logging.getLogger('test_real_tokens'),
        message_hub=MessageHub.get_instance('test_real_tokens'))
    hook = PromptStatsHook(interval=1)
    hook.before_train(runner)
    data_batch = dict(inputs=list(batch.images), data_samples=[
        SimpleNamespace(metainfo=dict(img_shape=shape, pad_shape=(48, 48)))
        for shape in batch.img_shapes])
    hook.before_train_iter(runner, 0, data_batch)
    with torch.no_grad():
        model(batch.images)  # the training forward the hook captures
    hook.after_train_iter(runner, 0, data_batch)
    expected = prompt_statistics(model, batch.images, {},
                                 img_shapes=batch.img_shapes)
    assert hook.last == pytest.approx(expected, rel=1e-6)
    naive = prompt_statistics(model, batch.images, {})
    assert hook.last['prompt_logit_kurtosis/block0'] != pytest.approx(
        naive['prompt_logit_kurtosis/block0'], rel=1e-3)


class _Listed(torch.utils.data.Dataset):
    """A data set with an mmcv pipeline (the attribute mmengine's
    ``BaseDataset`` has), holding nothing: the check reads no image."""

    def __init__(self, transforms):
        from mmengine.dataset import Compose
        self.pipeline = Compose(transforms)

    def __len__(self):
        return 1

    def __getitem__(self, index):  # pragma: no cover (never read)
        raise AssertionError('no image may be read before the check')


class _Repeat(torch.utils.data.Dataset):
    """A wrapper like mmengine's RepeatDataset (``.dataset``)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return 1

    def __getitem__(self, index):  # pragma: no cover (never read)
        raise AssertionError('no image may be read before the check')


def test_pipeline_pad_is_refused_before_statistics():
    """mmcv/mmdet's ``Pad`` in the training pipeline writes the padded size
    into ``img_shape``: the padding could not be left out of the whitening,
    prototypes or burstiness, so collecting from such a data set is refused
    naming the transform and where padding belongs."""
    import mmdet.datasets.transforms  # noqa: F401 (registers mmdet.Pad)
    from mmcv.transforms import RandomChoice
    from mmdet.datasets.transforms import Pad, RandomFlip
    from bpt_mm.engine.whitening_hook import preprocessed_batches
    from bpt_mm.whitening.real_tokens import pipeline_padding

    flip = RandomFlip(prob=0.5)
    plain = _Listed([flip])
    assert pipeline_padding(plain) == []
    assert pipeline_padding(None) == []
    padded = _Listed([flip, Pad(size_divisor=32)])
    nested = _Repeat(_Listed([RandomChoice([[flip], [Pad(size=(64, 64))]])]))
    for dataset, shown in ((padded, 'size_divisor=32'),
                           (nested, 'size=(64, 64)')):
        assert len(pipeline_padding(dataset)) == 1
        loader = torch.utils.data.DataLoader(dataset, batch_size=1)
        model = torch.nn.Module()  # never reached
        with pytest.raises(ValueError, match=r'pipeline pads images.*'
                           + re.escape(shown) + r'.*BatchFixedSizePad'):
            next(preprocessed_batches(model, loader))


def test_prompt_stats_hook_refuses_a_pipeline_pad(one_thread):
    """The hook reads ``img_shape`` from training batches: with a pipeline
    ``Pad`` those are padded sizes, so it refuses before training."""
    import logging
    from types import SimpleNamespace

    import mmdet.datasets.transforms  # noqa: F401
    from mmdet.datasets.transforms import Pad

    from bpt_mm.engine import PromptStatsHook
    loader = torch.utils.data.DataLoader(_Listed([Pad(size_divisor=32)]))
    runner = SimpleNamespace(iter=0, model=whitened_vit(),
                             logger=logging.getLogger('test_real_tokens'),
                             train_dataloader=loader)
    with pytest.raises(ValueError, match=r'PromptStatsHook.*pipeline pads'):
        PromptStatsHook(interval=1).before_train(runner)
