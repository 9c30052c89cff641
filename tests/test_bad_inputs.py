"""A catalogue of bad inputs, each refused with a message that names it.

Every case is one bad input: a call, the exception type it must raise and
regular expressions that must all occur in the message: one naming the
offending key, argument or file, one saying what was expected. Cases are
cheap (a 32-channel ViT with 2-4 blocks, 32x32 images, pure function calls);
the only subprocesses are the shell launcher's, which checks its arguments
before any Python starts.

The interrupted-run, atomic-save and distributed guarantees are in
``tests/test_interrupted.py`` and ``tests/test_whitening_hook.py``.
"""
import os
import os.path as osp
import re
import subprocess
import sys
from typing import Callable, List, NamedTuple, Type

import pytest
import torch
from mmengine.config import Config
from mmengine.runner.checkpoint import _load_checkpoint

from bpt_mm.engine import (BPTWhiteningHook, PromptStatsHook,
                           TrainableCheckpointHook)
from bpt_mm.data_check import (DataSetError, check_coco_set,
                               check_segmentation_set)
from bpt_mm.launch import (check_checkpoint_covers_model, check_data_paths,
                           check_load_from_checkpoint,
                           check_whitening_output, check_resume_checkpoint,
                           check_whitening_source, latest_checkpoint,
                           resolve_device)
from bpt_mm.models import PromptedViT, WhiteningNotReadyError
from bpt_mm.models.checkpoint import CheckpointError, load_pretrained
from bpt_mm.testing.tiny_data import ensure_tiny_data
from bpt_mm.engine.trainable_state import restore_frozen_backbone
from bpt_mm.whitening.accumulators import SecondMomentAccumulator
from bpt_mm.whitening.collect import collect_whitening
from bpt_mm.whitening.io import load_whitening, save_whitening
from bpt_mm.whitening.linalg import zca_whitening_matrix
from bpt_mm.whitening.options import WhiteningOptions
from helpers import ROOT, TOOLS, load_tool, small_vit
from whitening_toy import BPTWhiteningToyModel, toy_images, toy_runner

TINY_MASK_RCNN = osp.join(ROOT, 'configs', 'tiny', 'mask_rcnn_bpt_tiny.py')
# 32 channels, 4 blocks: enough for deep prompts in some blocks only.
ARCH = dict(embed_dims=32, num_layers=4, num_heads=2, mlp_ratio=2.0)
FWHITEN = dict(type='WhitenedPrompt', num_tokens=4)


def vit(**kwargs) -> PromptedViT:
    """The small ViT with 4 blocks and 16x16 patches (2x2 on 32x32)."""
    kwargs.setdefault('arch', ARCH)
    kwargs.setdefault('patch_size', 16)
    return small_vit(**kwargs)


def with_prompt(**prompt) -> Callable[[str], object]:
    return lambda tmp: vit(prompt=prompt)


class Case(NamedTuple):
    id: str
    call: Callable[[str], object]  # gets a fresh temporary directory
    error: Type[BaseException]
    patterns: List[str]


# ------------------------------------------------------------- helper files
def truncated(tmp: str, name: str = 'cut.pth') -> str:
    """The first half of a real checkpoint: what a killed writer leaves."""
    full = osp.join(tmp, 'full.pth')
    torch.save({'state_dict': {'w': torch.randn(256)}}, full)
    with open(full, 'rb') as f:
        data = f.read()
    path = osp.join(tmp, name)
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])
    return path


def text_file(tmp: str, name: str = 'notes.pth', text: str = 'hello') -> str:
    path = osp.join(tmp, name)
    with open(path, 'w') as f:
        f.write(text)
    return path


def whitening_file(tmp: str, name: str, **kwargs) -> str:
    """A whitening file of the toy backbone (3 blocks, d = 32), or of the
    backbone ``kwargs`` describe."""
    torch.manual_seed(0)
    prompt = dict(type='WhitenedPrompt', num_tokens=4, depth='deep')
    prompt.update(kwargs.pop('prompt', {}))
    backbone = small_vit(prompt=prompt, **kwargs)
    stats = WhiteningOptions(eps=1e-3)
    results = collect_whitening(backbone, toy_images(8).split(4), stats, 8)
    path = osp.join(tmp, name)
    save_whitening(path, results, backbone, stats)
    return path


def deep_toy() -> PromptedViT:
    torch.manual_seed(0)
    return small_vit(prompt=dict(type='WhitenedPrompt', num_tokens=4,
                                 depth='deep'))


def own_checkpoint(arch: dict) -> dict:
    """An mmengine checkpoint of the whitening toy model with ``arch``."""
    torch.manual_seed(0)
    model = BPTWhiteningToyModel(backbone=dict(arch=arch))
    return {'state_dict': model.state_dict(), 'meta': {}}


def few_tokens_run(tmp: str) -> None:
    """Training whose BPTWhiteningHook sees 1 image: 16 tokens, d = 32."""
    toy_runner(tmp, FWHITEN, [dict(type='BPTWhiteningHook', num_images=1)],
               num_images=4, batch_size=1, max_iters=1, lr=0.1, seed=None,
               default_hooks=dict(checkpoint=None, logger=None),
               checkpoint_interval=None, log_interval=None).train()


def uniform_spt_run(tmp: str) -> None:
    """Training whose BPTWhiteningHook initialises 4 k-means SPT prompts
    from uniform images: every patch embedding the same."""
    toy_runner(tmp, dict(type='SPTPrompt', num_tokens=4, init='kmeans'),
               [dict(type='BPTWhiteningHook', num_images=4)],
               dataset=dict(type='BPTWhiteningToyDataset', num_images=4,
                            fill=0.5),
               batch_size=2, max_iters=1, lr=0.1, seed=None,
               default_hooks=dict(checkpoint=None, logger=None),
               checkpoint_interval=None, log_interval=None).train()


def tiny_config(edit=None) -> Config:
    cfg = Config.fromfile(TINY_MASK_RCNN)
    if edit:
        edit(cfg)
    return cfg


def without_whitening_hook(cfg: Config) -> None:
    cfg.custom_hooks = [h for h in cfg.custom_hooks
                        if h['type'] != 'BPTWhiteningHook']


def train_with_missing_data(tmp: str) -> None:
    missing = osp.join(tmp, 'no_such_data') + '/'
    load_tool('train').main([
        TINY_MASK_RCNN, '--work-dir', osp.join(tmp, 'work'), '--cfg-options',
        f'train_dataloader.dataset.data_root={missing}'])


def evaluate_with_missing_annotations(tmp: str) -> None:
    ckpt = osp.join(tmp, 'any.pth')
    torch.save({'state_dict': {}}, ckpt)
    data = osp.join(tmp, 'data')
    os.makedirs(osp.join(data, 'val2017'))
    load_tool('test').main([
        TINY_MASK_RCNN, ckpt, '--work-dir', osp.join(tmp, 'work'),
        '--cfg-options', f'test_dataloader.dataset.data_root={data}/'])


def image_dir_missing(tmp: str) -> None:
    """Data root and annotation file exist, the image folder does not."""
    cfg = tiny_config(lambda c: c.train_dataloader.dataset.update(
        data_root=tmp + '/', ann_file=text_file(tmp, 'ann.json', '{}'),
        data_prefix=dict(img='images/')))
    check_data_paths(cfg, ['train_dataloader'])


def empty_marker(tmp: str):
    text_file(tmp, 'last_checkpoint', '')
    return latest_checkpoint(tmp)


def dist_train(gpus: str) -> Callable[[str], object]:
    def call(tmp: str) -> None:
        out = subprocess.run(
            ['bash', osp.join(TOOLS, 'dist_train.sh'), TINY_MASK_RCNN, gpus],
            cwd=tmp, capture_output=True, text=True, timeout=60,
            env=dict(os.environ, PYTHON=sys.executable))
        # The launcher's contract: exit status 2 and a message on stderr.
        raise SystemExit(f'exit {out.returncode}: {out.stderr.strip()}')
    return call


# ------------------------------------- helpers of the issue-14 cases below
def coco_set(tmp: str, edit=None, image_size=(20, 16), file_bytes=None
             ) -> dict:
    """A one-image COCO-format set under ``tmp``; ``edit(coco)`` changes
    the JSON first. Returns the dataset config."""
    import json
    from PIL import Image
    os.makedirs(osp.join(tmp, 'img'), exist_ok=True)
    image = osp.join(tmp, 'img', 'a.png')
    if file_bytes is None:
        Image.new('RGB', image_size).save(image)
    else:
        with open(image, 'wb') as f:
            f.write(file_bytes)
    coco = dict(
        images=[dict(id=1, file_name='a.png', width=20, height=16)],
        annotations=[dict(id=1, image_id=1, category_id=1,
                          bbox=[2, 2, 8, 8], area=64, iscrowd=0)],
        categories=[dict(id=1, name='square')])
    if edit:
        edit(coco)
    with open(osp.join(tmp, 'ann.json'), 'w') as f:
        json.dump(coco, f)
    return dict(type='CocoDataset', data_root=tmp + '/', ann_file='ann.json',
                data_prefix=dict(img='img/'),
                metainfo=dict(classes=('square', )),
                filter_cfg=dict(filter_empty_gt=True, min_size=8))


def check_coco(edit=None, **kwargs) -> Callable[[str], object]:
    return lambda tmp: check_coco_set('train_dataloader.dataset',
                                      coco_set(tmp, edit, **kwargs), True)


def truncated_json(tmp: str) -> None:
    dataset = coco_set(tmp)
    path = osp.join(tmp, 'ann.json')
    with open(path) as f:
        text = f.read()
    with open(path, 'w') as f:
        f.write(text[:len(text) // 2])
    check_coco_set('train_dataloader.dataset', dataset, True)


def seg_set(tmp: str, mask_size=(20, 16), mask_value: int = 3,
            mask_mode: str = 'L') -> None:
    """A one-image ADE20K-layout set; checks it."""
    import numpy as np
    from PIL import Image
    for d in ('images', 'masks'):
        os.makedirs(osp.join(tmp, d), exist_ok=True)
    Image.new('RGB', (20, 16)).save(osp.join(tmp, 'images', 'a.jpg'))
    Image.fromarray(np.full(mask_size[::-1], mask_value, np.uint8)).convert(
        mask_mode).save(osp.join(tmp, 'masks', 'a.png'))
    check_segmentation_set(
        'train_dataloader.dataset',
        dict(type='ADE20KDataset', data_root=tmp + '/',
             data_prefix=dict(img_path='images', seg_map_path='masks')))


def nan_pretrained(tmp: str) -> None:
    """A timm-layout file of the test ViT with one NaN weight."""
    state = {k: v for k, v in vit().state_dict().items()
             if not k.startswith('prompts.')}
    state['blocks.1.attn.qkv.weight'][0, 0] = float('nan')
    path = osp.join(tmp, 'vit_nan.pth')
    torch.save(state, path)
    load_pretrained(vit(), path)


def _pretrained_with(tmp: str, name: str, entries: dict) -> str:
    """A timm-layout file of the test ViT with ``entries`` replacing some
    of its values; returns its path."""
    state = {k: v for k, v in vit().state_dict().items()
             if not k.startswith('prompts.')}
    state.update(entries)
    path = osp.join(tmp, name)
    torch.save(state, path)
    return path


def toy_model(prompt=None):
    torch.manual_seed(0)
    return BPTWhiteningToyModel(backbone=dict(prompt=prompt))


def training_checkpoint(tmp: str, prompt=None, drop=()) -> str:
    """An mmengine-style checkpoint of the toy model (``meta`` with epoch
    and iter), without the keys in ``drop``."""
    state = {k: v for k, v in toy_model(prompt).state_dict().items()
             if k not in drop}
    path = osp.join(tmp, 'iter_4.pth')
    torch.save(dict(meta=dict(epoch=0, iter=4), state_dict=state), path)
    return path


def resume_from_pretrained(tmp: str) -> None:
    path = osp.join(tmp, 'mae_pretrain.pth')
    torch.save({'model': vit().state_dict()}, path)
    check_resume_checkpoint(toy_model(), path)


def resume_from_whitening_file(tmp: str) -> None:
    check_resume_checkpoint(toy_model(), whitening_file(tmp, 'w.pth'))


def run_tool(name: str, *argv: str) -> Callable[[str], object]:
    """``tools/NAME.py`` in-process; ``{tmp}`` in the arguments is the
    case's temporary directory."""
    return lambda tmp: load_tool(name).main(
        [a.replace('{tmp}', tmp) for a in argv])


def file_at(tmp: str, name: str = 'a_file') -> str:
    return text_file(tmp, name, 'mine')



# ---------------------------------------------------------------- catalogue
CASES = [
    # ------------------------------------------------ backbone (PromptedViT)
    Case('arch-unknown-name', lambda t: vit(arch='gigantic'), ValueError,
         [r'`arch`', r"must be one of \['base'", r"'gigantic'"]),
    Case('arch-dict-missing-key',
         lambda t: vit(arch=dict(embed_dims=32, num_layers=2)), ValueError,
         [r"missing \['num_heads'\]", r'needs keys']),
    Case('arch-dict-unknown-key', lambda t: vit(arch=dict(ARCH, depth=3)),
         ValueError, [r"unknown \['depth'\]", r'needs keys']),
    Case('arch-not-str-or-dict', lambda t: vit(arch=12), TypeError,
         [r'`arch`', r'a str or a dict']),
    Case('arch-zero-embed-dims',
         lambda t: vit(arch=dict(ARCH, embed_dims=0)), ValueError,
         [r'`arch.embed_dims`', r'positive int, got 0']),
    Case('arch-heads-do-not-divide',
         lambda t: vit(arch=dict(ARCH, embed_dims=30, num_heads=4)),
         ValueError, [r'`arch.embed_dims` \(30\)',
                      r'divisible by `arch.num_heads` \(4\)']),
    Case('arch-negative-mlp-ratio',
         lambda t: vit(arch=dict(ARCH, mlp_ratio=-1)), ValueError,
         [r'`arch.mlp_ratio`', r'positive number, got -1']),
    Case('patch-size-zero', lambda t: vit(patch_size=0), ValueError,
         [r'`patch_size`', r'positive int, got 0']),
    Case('patch-size-string', lambda t: vit(patch_size='16'), TypeError,
         [r'`patch_size`', r"positive int, got '16' \(str\)"]),
    Case('img-size-zero', lambda t: vit(img_size=0), ValueError,
         [r'`img_size`', r'positive int']),
    Case('in-channels-zero', lambda t: vit(in_channels=0), ValueError,
         [r'`in_channels`', r'positive int, got 0']),
    Case('out-indices-outside-model', lambda t: vit(out_indices=4),
         ValueError, [r'`out_indices`', r'\[-4, 3\]', r'4 blocks']),
    Case('window-size-negative', lambda t: vit(window_size=-2), ValueError,
         [r'`window_size`', r'int >= 0, got -2']),
    Case('global-attention-without-windows',
         lambda t: vit(global_attn_indexes=(1, )), ValueError,
         [r'`global_attn_indexes`', r'`window_size > 0`']),
    Case('drop-path-rate-one', lambda t: vit(drop_path_rate=1.0),
         ValueError, [r'`drop_path_rate`', r'\[0, 1\)']),
    Case('frozen-as-string', lambda t: vit(frozen='False'), TypeError,
         [r'`frozen`', r"True or False, got 'False'"]),
    Case('pretrained-and-init-cfg',
         lambda t: vit(pretrained='a.pth', init_cfg=dict(
             type='Pretrained', checkpoint='b.pth')), ValueError,
         [r'`pretrained`', r'`init_cfg`, not both']),
    Case('init-cfg-unknown-key',
         lambda t: vit(init_cfg=dict(type='Pretrained', checkpoint='x.pth',
                                     map_location='cpu')).init_weights(),
         ValueError, [r"unknown \['map_location'\]",
                      r"accepts keys \['type', 'checkpoint'\]"]),
    Case('init-cfg-without-checkpoint',
         lambda t: vit(init_cfg=dict(type='Pretrained')).init_weights(),
         ValueError, [r'`checkpoint`', r'the path of the weights']),
    Case('init-cfg-checkpoint-none',
         lambda t: vit(init_cfg=dict(type='Pretrained',
                                     checkpoint=None)).init_weights(),
         TypeError, [r'`init_cfg.checkpoint`', r'None \(NoneType\)']),
    Case('init-cfg-checkpoint-list',
         lambda t: vit(init_cfg=dict(type='Pretrained',
                                     checkpoint=['a.pth'])).init_weights(),
         TypeError, [r'`init_cfg.checkpoint`', r"\['a.pth'\] \(list\)"]),
    # --------------------------------------------------------------- prompts
    Case('prompt-key-typo',
         with_prompt(type='VPTPrompt', num_token=100), ValueError,
         [r'unknown key `prompt.num_token`', r"did you mean 'num_tokens'",
          r'allowed keys']),
    Case('prompt-num-tokens-string',
         with_prompt(type='VPTPrompt', num_tokens='100'), TypeError,
         [r'`prompt.num_tokens`', r"positive int, got '100' \(str\)"]),
    Case('prompt-num-tokens-zero',
         with_prompt(type='VPTPrompt', num_tokens=0), ValueError,
         [r'`prompt.num_tokens`', r'positive int, got 0']),
    Case('prompt-num-tokens-negative',
         with_prompt(type='VPTPrompt', num_tokens=-5), ValueError,
         [r'`prompt.num_tokens`', r'positive int, got -5']),
    Case('prompt-num-tokens-bool',
         with_prompt(type='VPTPrompt', num_tokens=True), TypeError,
         [r'`prompt.num_tokens`', r'positive int, got True \(bool\)']),
    Case('prompt-num-tokens-missing', with_prompt(type='VPTPrompt'),
         ValueError, [r'`prompt.num_tokens` is required',
                      r'number of prompt tokens']),
    Case('prompt-unknown-type', with_prompt(type='VPT', num_tokens=4),
         ValueError, [r'`prompt.type`',
                      r"one of \['BilinearPrompt', 'SPTPrompt', "
                      r"'VPTPrompt', 'WhitenedPrompt'\], got 'VPT'"]),
    Case('prompt-not-a-dict', lambda t: vit(prompt='VPTPrompt'), TypeError,
         [r'`prompt`', r'None or a dict, got str']),
    Case('bilinear-without-rank',
         with_prompt(type='BilinearPrompt', num_tokens=4), ValueError,
         [r'`prompt.rank`', r'required for BilinearPrompt']),
    Case('bilinear-rank-zero',
         with_prompt(type='BilinearPrompt', num_tokens=4, rank=0),
         ValueError, [r'`prompt.rank`', r'positive int, got 0']),
    Case('key-of-another-prompt-type',
         with_prompt(type='WhitenedPrompt', num_tokens=4, rank=8),
         ValueError, [r'`prompt.rank` for WhitenedPrompt', r'allowed keys']),
    Case('prompt-depth-unknown',
         with_prompt(type='VPTPrompt', num_tokens=4, depth='middle'),
         ValueError, [r'`prompt.depth`', r"'shallow' or 'deep'",
                      r"'middle'"]),
    Case('prompt-layers-outside-model',
         with_prompt(type='VPTPrompt', num_tokens=4, depth='deep',
                     layers=[1, 4]), ValueError,
         [r'`prompt.layers`', r'\[-4, 3\]', r'has 4 blocks', r'got 4']),
    Case('prompt-layers-for-shallow',
         with_prompt(type='VPTPrompt', num_tokens=4, layers=[1]),
         ValueError, [r'`prompt.layers`', r"only for depth='deep'"]),
    Case('prompt-layers-duplicated',
         with_prompt(type='VPTPrompt', num_tokens=4, depth='deep',
                     layers=[1, -3]), ValueError,
         [r'`prompt.layers`', r'duplicated blocks']),
    Case('trainable-projection-layers-not-prompted',
         with_prompt(type='BilinearPrompt', num_tokens=4, rank=4,
                     depth='deep', layers=[2, 3],
                     trainable_projection_layers=[1]), ValueError,
         [r'`prompt.trainable_projection_layers` \[1\]',
          r'not prompted blocks', r'\(2, 3\)']),
    Case('trainable-projection-layers-for-vpt',
         with_prompt(type='VPTPrompt', num_tokens=4, depth='deep',
                     trainable_projection_layers=[3]), ValueError,
         [r'`prompt.trainable_projection_layers`',
          r'needs a prompt with a trainable projection']),
    Case('prompt-dropout-one',
         with_prompt(type='VPTPrompt', num_tokens=4, dropout=1.0),
         ValueError, [r'`prompt.dropout`', r'\[0, 1\), got 1.0']),
    Case('whitened-tunable-string',
         with_prompt(type='WhitenedPrompt', num_tokens=4, tunable='yes'),
         TypeError, [r'`tunable`', r'True \(tWhiten\)', r"'yes'"]),
    Case('bilinear-whitening-init-int',
         with_prompt(type='BilinearPrompt', num_tokens=4, rank=4,
                     whitening_init=1), TypeError,
         [r'`whitening_init`', r'must be a bool, got 1']),
    Case('prompt-init-std-negative',
         with_prompt(type='BilinearPrompt', num_tokens=4, rank=4,
                     init_std=-0.1), ValueError,
         [r'`prompt.init_std`', r'float >= 0, got -0.1']),
    Case('prompt-allow-identity-string',
         with_prompt(type='WhitenedPrompt', num_tokens=4,
                     allow_identity_whitening='no'), TypeError,
         [r'`prompt.allow_identity_whitening`', r"bool, got 'no'"]),
    # ------------------------------------------------------------- whitening
    Case('training-without-whitening',
         lambda t: vit(prompt=dict(FWHITEN)).train()(torch.rand(1, 3, 32,
                                                                32)),
         WhiteningNotReadyError,
         [r'WhitenedPrompt prompts of blocks \[0\]', r'BPTWhiteningHook']),
    Case('hook-whitening-on-fewer-tokens-than-channels', few_tokens_run,
         ValueError, [r'block 0', r'only 16 tokens from 1 images',
                      r'd=32', r'at least 32 tokens']),
    Case('hook-spt-prompts-from-uniform-images', uniform_spt_run,
         ValueError, [r'block 0', r'only 1 distinct',
                      r'`prompt\.num_tokens`=4', r'`num_images`']),
    Case('whitening-features-with-nan',
         lambda t: collect_whitening(
             deep_toy(),
             [toy_images(4).index_put_((torch.tensor(1), ),
                                       torch.tensor(float('nan')))],
             WhiteningOptions(), 4), ValueError,
         [r'block 0', r'non-finite value']),
    Case('whitening-tokens-with-inf',
         lambda t: SecondMomentAccumulator(4, name='block 3').update(
             torch.tensor([[1., float('inf'), 0., 0.]])), ValueError,
         [r'block 3', r'1 non-finite value\(s\)']),
    Case('zca-of-nan-sigma',
         lambda t: zca_whitening_matrix(torch.full((4, 4), float('nan'))),
         ValueError, [r'`sigma`', r'non-finite']),
    Case('zca-of-non-square-sigma',
         lambda t: zca_whitening_matrix(torch.eye(4)[:3]), ValueError,
         [r'`sigma`', r'square \(d, d\) matrix']),
    Case('whitening-tokens-option-unknown',
         lambda t: WhiteningOptions(tokens='cls'), ValueError,
         [r'`tokens`', r"one of \('patch', 'all'\), got 'cls'"]),
    Case('whitening-eps-negative',
         lambda t: WhiteningOptions(eps=-1.0), ValueError,
         [r'`eps`', r'finite float >= 0']),
    Case('whitening-file-for-another-arch',
         lambda t: load_whitening(
             whitening_file(t, 'd16.pth', arch=dict(
                 embed_dims=16, num_layers=3, num_heads=2)), deep_toy()),
         ValueError, [r'd16\.pth', r'embed_dims=16', r'model has '
                      r'embed_dims=32']),
    Case('whitening-file-for-other-layers',
         lambda t: load_whitening(whitening_file(
             t, 'upper.pth', prompt=dict(layers=[1, 2])), deep_toy()),
         ValueError, [r'upper\.pth', r'blocks \[1, 2\]',
                      r'blocks \[0\] need it']),
    Case('whitening-file-missing',
         lambda t: load_whitening(osp.join(t, 'gone.pth'), deep_toy()),
         FileNotFoundError, [r'gone\.pth', r'does not exist']),
    Case('whitening-file-is-a-checkpoint',
         lambda t: load_whitening(
             (torch.save({'state_dict': {}}, osp.join(t, 'ck.pth')),
              osp.join(t, 'ck.pth'))[1], deep_toy()), ValueError,
         [r'ck\.pth', r'not a bpt_mm whitening file',
          r'tools/compute_whitening.py']),
    Case('whitening-file-truncated',
         lambda t: load_whitening(truncated(t, 'w_cut.pth'), deep_toy()),
         ValueError, [r'w_cut\.pth', r'not a readable whitening file']),
    Case('whitening-matrix-of-wrong-shape',
         lambda t: vit(prompt=dict(FWHITEN)).prompts['0'].set_whitening(
             torch.eye(16)), ValueError,
         [r'whitening matrix must have shape \(32, 32\)',
          r'got \(16, 16\)']),
    # ----------------------------------------------------------------- hooks
    Case('whitening-hook-option-typo',
         lambda t: BPTWhiteningHook(num_imgs=100), TypeError,
         [r"\['num_imgs'\]", r"did you mean 'num_images'",
          r'allowed options']),
    Case('prompt-stats-hook-option-typo',
         lambda t: PromptStatsHook(intervall=5), TypeError,
         [r"PromptStatsHook got unknown option\(s\) \['intervall'\]",
          r"did you mean 'interval'", r"allowed options: \['interval', "
          r"'source', 'product'\]"]),
    Case('whitening-hook-zero-images',
         lambda t: BPTWhiteningHook(num_images=0), ValueError,
         [r'`num_images`', r'positive int, got 0']),
    Case('whitening-hook-bilinear-init-unknown',
         lambda t: BPTWhiteningHook(bilinear_init='svd'), ValueError,
         [r'`bilinear_init`', r"one of \('random', 'eigen', 'identity'\)",
          r"'svd'"]),
    # A misspelt option value gets the allowed values and the closest one,
    # as a misspelt key does.
    Case('whitening-hook-bilinear-init-typo',
         lambda t: BPTWhiteningHook(bilinear_init='eigne'), ValueError,
         [r'`bilinear_init`', r"got 'eigne' \(did you mean 'eigen'\?\)"]),
    Case('whitening-hook-statistic-typo',
         lambda t: BPTWhiteningHook(statistic='paer'), ValueError,
         [r'`statistic`', r"did you mean 'paper'\?"]),
    Case('whitening-hook-product-typo',
         lambda t: BPTWhiteningHook(product='kq '), ValueError,
         [r'`product`', r"did you mean 'kq'\?"]),
    Case('whitening-hook-source-typo',
         lambda t: BPTWhiteningHook(source='norm'), ValueError,
         [r'`source`', r"did you mean 'norm1'\?"]),
    Case('whitening-hook-tokens-typo',
         lambda t: BPTWhiteningHook(tokens='patches'), ValueError,
         [r'`tokens`', r"did you mean 'patch'\?"]),
    Case('whitening-hook-statistic-not-a-string',
         lambda t: BPTWhiteningHook(statistic=3), ValueError,
         [r'`statistic`', r"\('paper', 'authors'\), got 3$"]),
    Case('spt-init-typo',
         with_prompt(type='SPTPrompt', num_tokens=4, init='kmean'),
         ValueError, [r'`prompt.init`', r"did you mean 'kmeans'\?"]),
    Case('spt-source-typo',
         with_prompt(type='SPTPrompt', num_tokens=4, source='patch_embd'),
         ValueError, [r'`prompt.source`', r"did you mean 'patch_embed'\?"]),
    Case('prompt-depth-typo',
         with_prompt(type='VPTPrompt', num_tokens=4, depth='shalow'),
         ValueError, [r'`prompt.depth`', r"did you mean 'shallow'\?"]),
    Case('prompt-type-typo',
         with_prompt(type='VPTPromt', num_tokens=4), ValueError,
         [r'`prompt.type`', r"did you mean 'VPTPrompt'\?"]),
    Case('whitening-hook-file-not-a-path',
         lambda t: BPTWhiteningHook(whitening_file=123), ValueError,
         [r'`whitening_file`', r'None or a path, got 123']),
    Case('trainable-checkpoint-hook-flag-string',
         lambda t: TrainableCheckpointHook(save_trainable_only='yes'),
         TypeError, [r'`save_trainable_only`', r"bool, got 'yes'"]),
    Case('config-needs-whitening-but-has-no-hook',
         lambda t: check_whitening_source(tiny_config(
             without_whitening_hook)), ValueError,
         [r'`model.backbone.prompt.type` is \'BilinearPrompt\'',
          r'no BPTWhiteningHook in `custom_hooks`', r'whitening_file']),
    # ----------------------------------------------------------------- tools
    Case('train-data-root-missing', train_with_missing_data,
         FileNotFoundError,
         [r'`train_dataloader.dataset.data_root`', r'no_such_data',
          r'does not exist', r'expected a directory']),
    Case('test-annotation-file-missing', evaluate_with_missing_annotations,
         FileNotFoundError,
         [r'`test_dataloader.dataset.ann_file`',
          r'instances_val2017\.json', r'expected a file']),
    Case('data-prefix-missing', image_dir_missing, FileNotFoundError,
         [r'`train_dataloader.dataset.data_prefix.img`', r'images/',
          r'expected a directory']),
    Case('dist-train-gpus-not-a-number', dist_train('two'), SystemExit,
         [r'exit 2', r"GPUS must be a positive integer, got 'two'"]),
    Case('dist-train-gpus-fractional', dist_train('1.5'), SystemExit,
         [r'exit 2', r"GPUS must be a positive integer, got '1.5'"]),
    Case('resume-marker-empty-and-no-checkpoint', empty_marker,
         FileNotFoundError, [r'last_checkpoint', r'is empty',
                             r'no iter_N.pth or epoch_N.pth']),
    # ----------------------------------------------------------- checkpoints
    Case('pretrained-checkpoint-truncated',
         lambda t: load_pretrained(vit(), truncated(t, 'mae_cut.pth')),
         CheckpointError, [r'mae_cut\.pth']),
    Case('pretrained-checkpoint-not-a-checkpoint',
         lambda t: load_pretrained(vit(), text_file(t, 'readme.pth')),
         CheckpointError, [r'readme\.pth']),
    Case('pretrained-checkpoint-for-another-arch',
         lambda t: load_pretrained(vit(), (torch.save(
             vit(arch=dict(ARCH, embed_dims=64)).state_dict(),
             osp.join(t, 'wide.pth')), osp.join(t, 'wide.pth'))[1]),
         CheckpointError, [r'wide\.pth', r'shape mismatch',
                           r'checkpoint \(1, 1, 64\) vs model \(1, 1, 32\)',
                           r'configured like the checkpoint']),
    Case('resume-checkpoint-truncated',
         lambda t: _load_checkpoint(truncated(t, 'iter_4.pth')),
         CheckpointError, [r'iter_4\.pth', r'truncated, corrupt or not a '
                           r'torch checkpoint']),
    Case('resume-checkpoint-empty',
         lambda t: _load_checkpoint(text_file(t, 'iter_6.pth', '')),
         CheckpointError, [r'iter_6\.pth', r'\(0 bytes\)',
                           r'truncated, corrupt']),
    Case('resume-checkpoint-not-a-checkpoint',
         lambda t: _load_checkpoint(text_file(t, 'iter_8.pth', 'x' * 40)),
         CheckpointError, [r'iter_8\.pth', r'not a torch checkpoint']),
    Case('checkpoint-for-wider-backbone',
         lambda t: restore_frozen_backbone(
             BPTWhiteningToyModel(backbone=dict()),
             own_checkpoint(dict(embed_dims=64, num_layers=3, num_heads=2,
                                 mlp_ratio=2.0)), source='wide_run.pth'),
         CheckpointError, [r"'wide_run\.pth' is for another backbone",
                           r"'backbone\.\w+'", r'model expects \(']),
    Case('checkpoint-for-deeper-backbone',
         lambda t: restore_frozen_backbone(
             BPTWhiteningToyModel(backbone=dict()),
             own_checkpoint(dict(embed_dims=32, num_layers=5, num_heads=2,
                                 mlp_ratio=2.0)), source='deep_run.pth'),
         CheckpointError, [r"'deep_run\.pth' is for another backbone",
                           r"'backbone\.blocks\.3\.", r'has 3 blocks']),
    # ---------------------------------------- issue 14: nothing silent
    # item 4: pretrained weights with NaN/Inf
    Case('pretrained-with-nan', nan_pretrained, CheckpointError,
         [r"vit_nan\.pth", r"NaN/Inf values in \['blocks\.1\.attn\.qkv"
          r"\.weight'\]"]),
    # item 9 and 12: values timm would change, a patch larger than the image
    Case('mlp-ratio-rounds-to-zero',
         lambda t: vit(arch=dict(ARCH, mlp_ratio=0.01)), ValueError,
         [r'`arch\.mlp_ratio` 0\.01', r'hidden width of int\(32 \* 0\.01\)'
          r' = 0', r'at least 1 / embed_dims']),
    Case('patch-larger-than-image', lambda t: vit(patch_size=64), ValueError,
         [r'`patch_size` \(64\) is larger than `img_size` \(32\)']),
    # item 11: --resume with a file that is not a training checkpoint
    Case('resume-from-pretrained-weights', resume_from_pretrained,
         ValueError, [r"--resume: '.*mae_pretrain\.pth' is not a training "
                      r'checkpoint', r'pretrained weights\?',
                      r'load_from=']),
    Case('resume-from-whitening-file', resume_from_whitening_file,
         ValueError, [r"--resume: '.*w\.pth' is not a training checkpoint",
                      r'a whitening file']),
    # a pretrained file whose weight names hold something else: refused,
    # not skipped (the model's own value would stay with a warning)
    Case('pretrained-weight-not-a-tensor',
         lambda t: load_pretrained(vit(), _pretrained_with(
             t, 'norm_int.pth', {'norm.weight': 5})),
         CheckpointError, [r"pretrained checkpoint '.*norm_int\.pth'",
                           r"entry 'norm\.weight' is a int, not a tensor"]),
    Case('pretrained-pos-embed-spoofs-the-plain-form',
         lambda t: load_pretrained(vit(), _pretrained_with(
             t, 'tagged.pth', {'pos_embed': {
                 '__bpt_mm_plain__': 'numpy', 'value': torch.zeros(3),
                 'scalar': False}})),
         CheckpointError, [r"tagged\.pth'", r"entry 'pos_embed' is a dict"]),
    # a checkpoint's meta of other types than a Runner writes
    Case('checkpoint-meta-not-a-dict',
         lambda t: restore_frozen_backbone(
             toy_model(), dict(meta=[1], state_dict={}), source='x.pth'),
         CheckpointError, [r"checkpoint 'x\.pth': \['meta'\] must be a "
                           r'dict, got a list']),
    Case('checkpoint-record-not-a-dict',
         lambda t: restore_frozen_backbone(
             toy_model(), dict(meta=dict(bpt_mm='yes'), state_dict={}),
             source='x.pth'),
         CheckpointError, [r"'x\.pth': \['meta'\]\['bpt_mm'\] must be a "
                           r'dict, got a str']),
    Case('resume-meta-iter-not-an-int',
         lambda t: check_resume_checkpoint(toy_model(), (torch.save(
             dict(meta=dict(epoch=0, iter='60'),
                  state_dict=toy_model().state_dict()),
             osp.join(t, 'iter_60.pth')), osp.join(t, 'iter_60.pth'))[1]),
         ValueError, [r"iter_60\.pth': \['meta'\]\['iter'\] must be a "
                      r"non-negative int, got '60'"]),
    Case('resume-from-a-merged-checkpoint',  # meta and state_dict only
         lambda t: check_resume_checkpoint(toy_model(),
                                           training_checkpoint(t)),
         ValueError, [r"iter_4\.pth' has no `message_hub` dict",
                      r'load_from=']),
    Case('resume-without-optimizer-state',
         lambda t: check_resume_checkpoint(toy_model(), (torch.save(
             dict(meta=dict(epoch=0, iter=4),
                  state_dict=toy_model().state_dict(),
                  message_hub=dict(log_scalars={}, runtime_info={},
                                   resumed_keys={})),
             osp.join(t, 'iter_4.pth')), osp.join(t, 'iter_4.pth'))[1]),
         ValueError, [r"iter_4\.pth' holds no optimizer state",
                      r'save_optimizer=False', r'load_from=']),
    # load_from (no --resume) naming a file mmengine would load nothing of
    Case('load-from-whitening-file',
         lambda t: check_load_from_checkpoint(toy_model(),
                                              whitening_file(t, 'w.pth')),
         ValueError, [r"load_from: '.*w\.pth' is a whitening file",
                      r"BPTWhiteningHook', whitening_file="]),
    Case('load-from-backbone-only-weights',
         lambda t: check_load_from_checkpoint(toy_model(), (torch.save(
             {'model': vit().state_dict()}, osp.join(t, 'mae.pth')),
             osp.join(t, 'mae.pth'))[1]),
         ValueError, [r"load_from: '.*mae\.pth' holds none of the \d+ "
                      r'weights', r'pretrained weights\?',
                      r'model\.backbone\.init_cfg']),
    # item 5: --resume into other prompt shapes
    Case('resume-with-other-prompt-rank',
         lambda t: check_resume_checkpoint(
             toy_model(dict(type='BilinearPrompt', num_tokens=4, rank=4)),
             training_checkpoint(t, dict(type='BilinearPrompt',
                                         num_tokens=4, rank=8))),
         ValueError, [r'iter_4\.pth', r'backbone\.prompts\.0\.\w+: '
                      r'checkpoint \(\d+, 8\) vs model \(\d+, 4\)']),
    Case('resume-with-other-prompt-type',
         lambda t: check_resume_checkpoint(
             toy_model(dict(type='BilinearPrompt', num_tokens=4, rank=4)),
             training_checkpoint(t, dict(type='VPTPrompt', num_tokens=4))),
         ValueError, [r'iter_4\.pth', r'lacks 2 trainable weight',
                      r'backbone\.prompts\.0\.coefficients']),
    # item 6: testing a checkpoint of another config
    Case('test-checkpoint-without-the-heads',
         lambda t: check_checkpoint_covers_model(
             toy_model(), training_checkpoint(t, drop=('head.weight',
                                                       'head.bias'))),
         ValueError, [r"iter_4\.pth' lacks 2 of the \d+ trained weights",
                      r'head\.weight, head\.bias', r'another config']),
    # items 8 and 10: data sets that contradict their annotations
    Case('coco-json-truncated', truncated_json, DataSetError,
         [r'train_dataloader\.dataset\.ann_file', r"ann\.json' is not "
          r'valid JSON', r'line 1, column \d+', r'truncated']),
    Case('coco-json-without-images', check_coco(lambda c: c.clear()),
         DataSetError, [r"ann\.json' has no `images`"]),
    Case('coco-no-annotations',
         check_coco(lambda c: c.update(annotations=[])), DataSetError,
         [r"ann\.json' has no `annotations`"]),
    Case('coco-no-known-category',
         check_coco(lambda c: c['categories'][0].update(name='disk')),
         DataSetError, [r"none of the categories of .*ann\.json' "
                        r"\(\['disk'\]\)", r"\['square'\]"]),
    Case('coco-no-image-with-objects',
         check_coco(lambda c: c['annotations'][0].update(image_id=7)),
         DataSetError, [r"no image of .*ann\.json' has an annotation"]),
    Case('coco-all-images-filtered',
         check_coco(lambda c: c['images'][0].update(width=4, height=4),
                    image_size=(4, 4)),
         DataSetError, [r"all 1 images of .*ann\.json' are filtered out",
                        r'filter_cfg', r'at least 8 pixels']),
    Case('coco-width-is-a-string',
         check_coco(lambda c: c['images'][0].update(width='20')),
         DataSetError, [r"ann\.json' has no positive numeric `width` and "
                        r"`height` \(got \['20', 16\]\)"]),
    Case('coco-image-without-height',
         check_coco(lambda c: c['images'][0].pop('height')),
         DataSetError, [r"ann\.json' has no positive numeric `width` and "
                        r'`height` \(got \[20, None\]\)']),
    Case('coco-zero-byte-image', check_coco(file_bytes=b''), DataSetError,
         [r"data_prefix\.img: image file .*a\.png' is empty \(0 bytes\)"]),
    Case('coco-image-size-differs', check_coco(image_size=(1, 1)),
         DataSetError, [r"image file .*a\.png' is 1x1", r'annotations say '
                        r'20x16']),
    Case('ade-mask-in-colour', lambda t: seg_set(t, mask_mode='RGB'),
         DataSetError, [r"seg_map_path: mask .*a\.png' has 3 channels "
                        r'\(RGB\)']),
    Case('ade-mask-size-differs', lambda t: seg_set(t, mask_size=(10, 8)),
         DataSetError, [r"seg_map_path: mask .*a\.png' is 10x8",
                        r"image .*a\.jpg' is 20x16"]),
    Case('ade-mask-values-beyond-classes',
         lambda t: seg_set(t, mask_value=200), DataSetError,
         [r"mask .*a\.png' holds values \[200\]", r'0\.\.150']),
    # item 12: options that name the problem
    Case('work-dir-is-a-file',
         lambda t: load_tool('train').main(
             [TINY_MASK_RCNN, '--work-dir', file_at(t)]), ValueError,
         [r"--work-dir '.*a_file' is an existing file"]),
    Case('max-iters-not-a-number',
         run_tool('train', TINY_MASK_RCNN, '--work-dir', '{tmp}/w',
                  '--cfg-options', 'train_cfg.max_iters=abc'),
         ValueError, [r'`train_cfg\.max_iters` must be an int >= 1',
                      r"'abc' \(str\)"]),
    Case('device-without-that-gpu', lambda t: resolve_device('cuda:99'),
         ValueError, [r"--device 'cuda:99'"]),
    Case('device-not-a-device', lambda t: resolve_device('gpu'),
         ValueError, [r"--device 'gpu' is not a torch device"]),
    Case('whitening-out-is-a-directory', lambda t: check_whitening_output(t),
         ValueError, [r"--out '.*' is a directory"]),
    Case('whitening-out-is-a-user-file',
         lambda t: check_whitening_output(file_at(t, 'notes.pth')), ValueError,
         [r"--out '.*notes\.pth' exists and is not a whitening file"]),
    Case('tiny-data-out-is-a-file',
         lambda t: ensure_tiny_data(file_at(t), num_train=1, num_val=1),
         ValueError, [r"output folder \(--out\) '.*a_file' is an existing "
                      r'file']),
]


def test_catalogue_is_large_and_distinct():
    ids = [case.id for case in CASES]
    assert len(set(ids)) == len(ids), 'duplicate case ids'
    assert len(ids) >= 40, len(ids)


# Tiny tensors gain nothing from threads, and the machine is shared.
pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.mark.parametrize('case', CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_by_name(case, tmp_path):
    with pytest.raises(case.error) as info:
        case.call(str(tmp_path))
    message = str(info.value)
    for pattern in case.patterns:
        assert re.search(pattern, message), \
            f'{case.id}: {pattern!r} not in the message:\n{message}'


def test_benchmark_refuses_a_zero_inference_size(capsys):
    # argparse's contract: exit status 2, the option named on stderr.
    benchmark = load_tool('benchmark')
    with pytest.raises(SystemExit) as info:
        benchmark.parse_args(['--infer-size', '0'])
    assert info.value.code == 2
    assert '--infer-size must be a positive int, got 0' in \
        capsys.readouterr().err


def _rotated_jpeg(path: str, stored_size=(20, 16)) -> None:
    """A JPEG stored ``stored_size`` (width, height) with EXIF orientation 6
    (turn 90 degrees: a phone's portrait photo)."""
    from PIL import Image
    exif = Image.Exif()
    exif[0x0112] = 6
    os.makedirs(osp.dirname(path), exist_ok=True)
    Image.new('RGB', stored_size).save(path, exif=exif)


def test_data_check_sizes_exif_turned_images_as_the_loader_does(tmp_path):
    """The preflight compares annotations with the image as mmcv's
    ``imfrombytes`` loads it ('color' applies the EXIF orientation), not
    with the stored size: a COCO entry listing the stored size (boxes on
    the wrong pixels) is refused, the displayed size accepted; an ADE mask
    of the displayed size is accepted and one of the stored size refused."""
    import json

    import mmcv
    image = str(tmp_path / 'coco' / 'img' / 'a.jpg')
    _rotated_jpeg(image)
    with open(image, 'rb') as f:
        loaded = mmcv.imfrombytes(f.read(), flag='color').shape[:2]
    assert loaded == (20, 16)  # (h, w): the loader turned the 20x16 file

    def coco(width: int, height: int, **load) -> dict:
        ann = dict(images=[dict(id=1, file_name='a.jpg', width=width,
                                height=height)],
                   annotations=[dict(id=1, image_id=1, category_id=1,
                                     bbox=[2, 2, 8, 8], area=64,
                                     iscrowd=0)],
                   categories=[dict(id=1, name='square')])
        with open(tmp_path / 'coco' / 'ann.json', 'w') as f:
            json.dump(ann, f)
        return dict(type='CocoDataset', data_root=str(tmp_path / 'coco'),
                    ann_file='ann.json', data_prefix=dict(img='img/'),
                    metainfo=dict(classes=('square', )),
                    pipeline=[dict(type='LoadImageFromFile', **load)])

    key = 'train_dataloader.dataset'
    check_coco_set(key, coco(16, 20), True)  # displayed size: as loaded
    with pytest.raises(DataSetError,
                       match=r"a\.jpg' is stored 20x16 .*EXIF orientation"
                             r".*color_ignore_orientation"):
        check_coco_set(key, coco(20, 16), True)
    # A pipeline that keeps the stored pixels wants the stored size.
    check_coco_set(key, coco(20, 16,
                             color_type='color_ignore_orientation'), True)
    with pytest.raises(DataSetError, match=r"a\.jpg' is 20x16"):
        check_coco_set(key, coco(16, 20,
                                 color_type='color_ignore_orientation'), True)

    from PIL import Image
    seg = tmp_path / 'ade'
    _rotated_jpeg(str(seg / 'images' / 'a.jpg'))
    os.makedirs(seg / 'masks')
    dataset = dict(type='ADE20KDataset', data_root=str(seg),
                   data_prefix=dict(img_path='images', seg_map_path='masks'))
    Image.new('L', (16, 20), 3).save(seg / 'masks' / 'a.png')  # as loaded
    check_segmentation_set('train_dataloader.dataset', dataset)
    Image.new('L', (20, 16), 3).save(seg / 'masks' / 'a.png')  # stored
    with pytest.raises(DataSetError,
                       match=r"mask .*a\.png' is 20x16 but its image .*"
                             r"is 16x20 as loaded"):
        check_segmentation_set('train_dataloader.dataset', dataset)


def test_load_from_a_checkpoint_of_the_model_is_accepted(tmp_path):
    """The load_from check refuses only files with none of the model's
    weights: a checkpoint of the model, even without its heads (a usual
    fine-tuning start), passes."""
    check_load_from_checkpoint(toy_model(), training_checkpoint(
        str(tmp_path), drop=('head.weight', 'head.bias')))


def test_coco_sizes_written_as_floats_are_accepted(tmp_path):
    """JSON numbers such as 20.0 (some exporters) are sizes, as in mmdet."""
    check_coco_set('train_dataloader.dataset', coco_set(
        str(tmp_path), lambda c: c['images'][0].update(width=20.0,
                                                       height=16.0)), True)
