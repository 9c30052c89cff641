"""Every config under configs/: it parses, its model builds, and what trains
is what its file name says.

Expectations come from the file name through the explicit tables below
(:data:`DETECTORS`, :data:`VARIANTS`, :data:`VIT_B_PROMPT_PARAMS`), not from
the configs themselves, so a config that drifts from its name fails. Full-size
models are built with a narrow ViT (32 channels, still 12 blocks so block
indices stay valid) and without their checkpoint; the ViT-B parameter counts
are computed on the meta device.
"""
import copy
import functools
import glob
import os
import os.path as osp
from typing import Any, Dict, NamedTuple, Optional, Tuple

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope

import bpt_mm  # noqa: F401  registers bpt_mm's modules
from bpt_mm.models import PromptedViT
from bpt_mm.utils import trainable_parameters
from bpt_mm.whitening.collect import prototype_blocks, whitening_blocks

# A rank above the narrow ViT's min(m, d) would be warned about; the
# counts are what is tested here.
pytestmark = pytest.mark.filterwarnings(
    'ignore:`prompt.rank`=100 is above:UserWarning')

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG_DIR = osp.join(ROOT, 'configs')


def _config_names():
    """Config files relative to configs/, without '.py'; _base_ excluded."""
    paths = glob.glob(osp.join(CONFIG_DIR, '**', '*.py'), recursive=True)
    names = [osp.relpath(p, CONFIG_DIR)[:-3].replace(os.sep, '/')
             for p in paths]
    return sorted(n for n in names if '_base_' not in n.split('/'))


ALL = _config_names()
FULL = [n for n in ALL if not n.startswith('tiny/')]
TINY = [n for n in ALL if n.startswith('tiny/')]

# ------------------------------------------------------------------ tables
#: Config name prefix -> default_scope (which registry builds it).
DETECTORS = {
    'cascade_mask_rcnn': 'mmdet',  # before 'mask_rcnn': longest prefix wins
    'mask_rcnn': 'mmdet',
    'upernet': 'mmseg',
}

ALL_BLOCKS = tuple(range(12))
TOP4 = (8, 9, 10, 11)


class Expect(NamedTuple):
    """What a variant trains in a 12-block ViT.

    prompt: prompt class name, or None.
    blocks: blocks that have a prompt module.
    projection: blocks whose projection (bilinear B, or W) is a trainable
        parameter.
    hook: whether the variant needs BPTWhiteningHook.
    backbone: whether the ViT's own weights train.
    """
    prompt: Optional[str]
    blocks: Tuple[int, ...]
    projection: Tuple[int, ...]
    hook: bool
    backbone: bool = False


#: Variant (the name after the detector prefix) -> expectation.
VARIANTS = {
    'bpt': Expect('BilinearPrompt', (0, ), (0, ), hook=True),
    'bpt_random': Expect('BilinearPrompt', (0, ), (0, ), hook=False),
    'bpt_deep': Expect('BilinearPrompt', ALL_BLOCKS, TOP4, hook=True),
    'bpt_deep_top4': Expect('BilinearPrompt', TOP4, TOP4, hook=True),
    'bpt_fwhiten': Expect('WhitenedPrompt', (0, ), (), hook=True),
    'bpt_fwhiten_deep': Expect('WhitenedPrompt', ALL_BLOCKS, (), hook=True),
    'bpt_fwhiten_deep_top4': Expect('WhitenedPrompt', TOP4, (), hook=True),
    'bpt_twhiten': Expect('WhitenedPrompt', (0, ), (0, ), hook=True),
    'bpt_twhiten_deep': Expect('WhitenedPrompt', ALL_BLOCKS, TOP4,
                               hook=True),
    'bpt_twhiten_deep_top4': Expect('WhitenedPrompt', TOP4, TOP4, hook=True),
    'vpt': Expect('VPTPrompt', (0, ), (), hook=False),
    'vpt_deep': Expect('VPTPrompt', ALL_BLOCKS, (), hook=False),
    # SPT: VPT's prompts, initialised from data by the hook
    'spt': Expect('SPTPrompt', (0, ), (), hook=True),
    'spt_deep': Expect('SPTPrompt', ALL_BLOCKS, (), hook=True),
    'linear_probe': Expect(None, (), (), hook=False),
    'full_finetune': Expect(None, (), (), hook=False, backbone=True),
}

#: Trainable prompt + whitening parameters at ViT-B size (d = 768, m = 100,
#: p = 100), worked out by hand: m*p (A) and d*p (B) per bilinear block,
#: m*d (P) per VPT/whitened block, d*d (W) per trainable whitening.
VIT_B_PROMPT_PARAMS = {
    'bpt': 86_800,  # 100*100 + 768*100, the paper's p = 100 figure
    'bpt_random': 86_800,
    'bpt_deep': 12 * 10_000 + 4 * 76_800,  # 427,200
    'bpt_deep_top4': 4 * 10_000 + 4 * 76_800,  # 347,200
    'bpt_fwhiten': 76_800,
    'bpt_fwhiten_deep': 12 * 76_800,
    'bpt_fwhiten_deep_top4': 4 * 76_800,
    'bpt_twhiten': 666_624,  # the paper's 66.66 x 1e-2 M
    'bpt_twhiten_deep': 12 * 76_800 + 4 * 589_824,
    'bpt_twhiten_deep_top4': 4 * 76_800 + 4 * 589_824,
    'vpt': 76_800,  # the paper's 7.68 x 1e-2 M
    'vpt_deep': 12 * 76_800,
    'spt': 76_800,  # VPT's count
    'spt_deep': 12 * 76_800,
    'linear_probe': 0,
    'full_finetune': 0,
}

#: The narrow ViT the full-size models are built with.
# d = 128: above the configs' rank p = 100, which a whitening-initialised
# bilinear prompt needs (prompt.rank <= embed_dims is checked at build).
SMALL_ARCH = dict(embed_dims=128, num_layers=12, num_heads=2, mlp_ratio=1.0)
WHITENING_HOOKS = ('BPTWhiteningHook', 'bpt_mm.BPTWhiteningHook')
STATS_HOOKS = ('PromptStatsHook', 'bpt_mm.PromptStatsHook')


def parse_name(name: str) -> Tuple[str, str]:
    """'cascade_mask_rcnn_bpt_deep' -> ('cascade_mask_rcnn', 'bpt_deep');
    tiny configs drop their '_tiny' suffix."""
    stem = osp.basename(name)
    if name.startswith('tiny/'):
        assert stem.endswith('_tiny'), f'{name}: tiny configs end in _tiny'
        stem = stem[:-len('_tiny')]
    for det in sorted(DETECTORS, key=len, reverse=True):
        if stem.startswith(det + '_'):
            variant = stem[len(det) + 1:]
            assert variant in VARIANTS, (
                f'{name}: unknown variant {variant!r}; add it to VARIANTS '
                f'in {__file__}')
            return det, variant
    raise AssertionError(f'{name}: unknown detector; add it to DETECTORS '
                         f'in {__file__}')


# -------------------------------------------------------------- fixtures
@pytest.fixture(scope='module', autouse=True)
def fast_config_parsing():
    """Cache what mmengine re-reads for every ``mmdet::``/``mmseg::`` base.

    For each such path mmengine re-imports the package to see that it is
    installed and reads every metafile of its model index (about 0.3 s, four
    times per config) to see whether the path names a model. Both answers
    are the same every time, so they are cached here; parsing is otherwise
    unchanged.
    """
    from mmengine.config import config as config_module
    from mmengine.config import utils as config_utils
    read_yaml = functools.lru_cache(maxsize=None)(config_utils.load)
    installed = functools.lru_cache(maxsize=None)(config_module.is_installed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config_utils, 'load', read_yaml)
        mp.setattr(config_module, 'is_installed', installed)
        yield


@functools.lru_cache(maxsize=None)
def _load(name: str) -> Config:
    return Config.fromfile(osp.join(CONFIG_DIR, name + '.py'))


def load(name: str) -> Config:
    """A private copy of the parsed config (parsed once per session)."""
    return copy.deepcopy(_load(name))


@functools.lru_cache(maxsize=None)
def _registries() -> Dict[str, Any]:
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmdet.utils import register_all_modules as register_mmdet
    from mmseg.registry import MODELS as MMSEG_MODELS
    from mmseg.utils import register_all_modules as register_mmseg
    register_mmdet(init_default_scope=False)
    register_mmseg(init_default_scope=False)
    return dict(mmdet=MMDET_MODELS, mmseg=MMSEG_MODELS)


def build(cfg_model: dict, scope: str) -> nn.Module:
    with DefaultScope.overwrite_default_scope(scope):
        return _registries()[scope].build(cfg_model)


def _replace_sync_bn(obj: Any) -> Any:
    """SyncBN -> BN everywhere in a config (one process, no GPU)."""
    if isinstance(obj, dict):
        if obj.get('type') == 'SyncBN':
            obj['type'] = 'BN'
        for value in obj.values():
            _replace_sync_bn(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _replace_sync_bn(value)
    return obj


def small_model_cfg(name: str, cfg: Config) -> dict:
    """The config's model, narrowed for a quick CPU build.

    Full-size configs get a 128-channel 12-block ViT without checkpoint, and
    the layers that read the ViT's channels are narrowed to match; tiny
    configs are built as they are.
    """
    model = copy.deepcopy(cfg.model)
    if name.startswith('tiny/'):
        return model
    width = SMALL_ARCH['embed_dims']
    backbone = model.backbone
    backbone.arch = dict(SMALL_ARCH)
    backbone.img_size = 64
    backbone.pop('init_cfg', None)  # the checkpoint does not exist here
    if 'pretrained' in model:
        model.pretrained = None
    neck = model.neck
    if neck.type == 'SimpleFeaturePyramid':
        neck.in_channels = width
    elif neck.type == 'Feature2Pyramid':
        neck.embed_dim = width
        model.decode_head.update(in_channels=[width] * 4, channels=16)
        model.auxiliary_head.update(in_channels=width, channels=16)
    else:
        raise AssertionError(f'{name}: unexpected neck {neck.type}')
    return _replace_sync_bn(model)


def built(name: str) -> nn.Module:
    cfg = load(name)
    return build(small_model_cfg(name, cfg), cfg.default_scope)


@pytest.fixture(scope='module', params=ALL)
def name(request) -> str:
    """Each config name; module scope makes pytest run all the tests of one
    config together, so only one built model is alive at a time."""
    return request.param


@pytest.fixture(scope='module')
def model(name: str) -> nn.Module:
    return built(name)


def expected_prompt_counts(variant: str, d: int, m: int,
                           p: Optional[int]) -> Tuple[int, int]:
    """(prompts, whitening) trainable counts from the VARIANTS table."""
    e = VARIANTS[variant]
    if e.prompt is None:
        return 0, 0
    if e.prompt == 'BilinearPrompt':
        return len(e.blocks) * m * p + len(e.projection) * d * p, 0
    # VPTPrompt, SPTPrompt and WhitenedPrompt: P at every block; W where
    # it trains
    return len(e.blocks) * m * d, len(e.projection) * d * d


def hook_types(cfg: Config):
    return [h['type'] for h in cfg.get('custom_hooks', [])]


# ------------------------------------------------------------------ tests
def test_the_expected_set_of_configs_exists():
    want = {f'{det}_{variant}' for det in DETECTORS for variant in VARIANTS}
    assert set(FULL) == want
    assert set(TINY) == {'tiny/mask_rcnn_bpt_tiny',
                         'tiny/cascade_mask_rcnn_bpt_tiny',
                         'tiny/upernet_bpt_tiny',
                         'tiny/mask_rcnn_spt_tiny'}


def test_parses_with_imports_and_scope(name):
    det, _ = parse_name(name)
    cfg = load(name)
    assert 'bpt_mm' in cfg.custom_imports['imports'], name
    assert cfg.custom_imports['allow_failed_imports'] is False, name
    assert cfg.default_scope == DETECTORS[det], name
    assert cfg.model.backbone.type == 'PromptedViT', name
    assert 'TrainableParametersHook' in hook_types(cfg), name
    # every run resumes exactly (RNG states in each checkpoint)
    assert 'RandomStateHook' in hook_types(cfg), name
    # every run stops at its first non-finite loss or weight
    assert 'FiniteCheckHook' in hook_types(cfg), name


def test_trainable_only_checkpoints_exactly_where_the_backbone_is_frozen(
        name, model):
    cfg = load(name)
    stripping = 'TrainableCheckpointHook' in hook_types(cfg)
    # a frozen backbone that comes from a file: leave it out of checkpoints;
    # full fine-tuning trains it, a tiny config's random one has no file
    expected = model.backbone.frozen and not name.startswith('tiny/')
    assert stripping == expected, name
    if stripping:
        assert cfg.model.backbone.init_cfg.type == 'Pretrained', name


def test_whitening_hook_exactly_where_needed(name, model):
    _, variant = parse_name(name)
    cfg = load(name)
    has_hook = any(t in WHITENING_HOOKS for t in hook_types(cfg))
    assert has_hook == VARIANTS[variant].hook, name
    # and the table agrees with what the built model asks for
    needs = bool(whitening_blocks(model.backbone)
                 or prototype_blocks(model.backbone))
    assert needs == VARIANTS[variant].hook, name


def test_prompt_stats_hook_exactly_in_the_bpt_configs(name):
    _, variant = parse_name(name)
    cfg = load(name)
    entries = [h for h in cfg.get('custom_hooks', [])
               if h['type'] in STATS_HOOKS]
    # on in every BPT config (whitened, random-basis, tiny), off elsewhere
    assert len(entries) == int(variant.startswith('bpt')), name
    for entry in entries:
        # measured on exactly the iterations the logger writes
        assert entry['interval'] == cfg.default_hooks.logger.interval, name


def test_trainable_groups_match_the_name(name, model):
    _, variant = parse_name(name)
    e = VARIANTS[variant]
    cfg = load(name)
    backbone = model.backbone
    counts = trainable_parameters(model)

    for group in ('neck', 'heads'):
        c = counts[group]
        assert c['trainable'] == c['total'] > 0, (name, group, c)
    c = counts['backbone']
    if e.backbone:
        assert c['trainable'] == c['total'] > 0, (name, c)
    else:
        assert c['trainable'] == 0 and c['total'] > 0, (name, c)

    if e.prompt is None:
        assert not backbone.prompts, name
        assert counts['prompts']['total'] == counts['whitening']['total'] \
            == 0, name
        return
    prompt = cfg.model.backbone.prompt
    assert prompt.type == e.prompt, name
    modules = backbone.prompt_modules()
    assert tuple(sorted(modules)) == e.blocks, name
    attr = 'basis' if e.prompt == 'BilinearPrompt' else 'whitening'
    for block, module in modules.items():
        assert all(p.requires_grad for p in module.parameters()), name
        if e.prompt in ('VPTPrompt', 'SPTPrompt'):
            continue
        is_param = isinstance(getattr(module, attr), nn.Parameter)
        assert is_param == (block in e.projection), (name, block, attr)
    want = expected_prompt_counts(variant, backbone.embed_dims,
                                  prompt.num_tokens, prompt.get('rank'))
    got = (counts['prompts']['trainable'], counts['whitening']['trainable'])
    assert got == want, name
    if e.prompt == 'WhitenedPrompt':
        assert prompt.tunable == bool(e.projection), name


def test_optimizer_holds_exactly_the_trainable_params(name, model):
    _, variant = parse_name(name)
    cfg = load(name)
    wrapper = build_optim_wrapper(model, copy.deepcopy(cfg.optim_wrapper))
    in_optimizer = {id(p) for g in wrapper.optimizer.param_groups
                    for p in g['params']}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_optimizer == trainable, name
    if variant == 'full_finetune':
        rate = cfg.optim_wrapper.paramwise_cfg.layer_decay_rate
        lrs = sorted({g['lr'] for g in wrapper.optimizer.param_groups})
        base = cfg.optim_wrapper.optimizer.lr
        # patch embedding 13 decays below the heads (12 blocks + 1)
        assert lrs[0] == pytest.approx(base * rate**13), name
        assert lrs[-1] == pytest.approx(base), name


@pytest.mark.parametrize('name', FULL)
def test_full_size_settings(name):
    det, variant = parse_name(name)
    cfg = load(name)
    backbone = cfg.model.backbone
    assert backbone.arch == 'base' and backbone.patch_size == 16, name
    assert backbone.init_cfg == dict(
        type='Pretrained',
        checkpoint='checkpoints/mae_pretrain_vit_base.pth'), name
    assert backbone.frozen == (variant != 'full_finetune'), name
    if backbone.get('prompt') is not None:
        assert backbone.prompt.num_tokens == 100, name
        if backbone.prompt.type == 'BilinearPrompt':
            assert backbone.prompt.rank == 100, name
            assert backbone.prompt.whitening_init == \
                (variant != 'bpt_random'), name
    for hook in cfg.custom_hooks:
        if hook['type'] in WHITENING_HOOKS:
            assert hook['num_images'] == 100, name
    rate = cfg.optim_wrapper.paramwise_cfg.layer_decay_rate
    assert cfg.optim_wrapper.constructor == \
        'LayerDecayOptimWrapperConstructor', name
    if variant == 'full_finetune':
        assert backbone.drop_path_rate == 0.1, name
        assert rate == (0.65 if det == 'upernet' else 0.7), name
        assert cfg.find_unused_parameters is True, name
    else:
        assert rate == 1.0, name
    if DETECTORS[det] == 'mmdet':
        assert backbone.img_size == 1024 and backbone.window_size == 14
        assert tuple(backbone.global_attn_indexes) == (2, 5, 8, 11)
        assert cfg.train_cfg.type == 'EpochBasedTrainLoop', name
        assert cfg.train_cfg.max_epochs == 36, name
        steps = [s for s in cfg.param_scheduler
                 if s['type'] == 'MultiStepLR']
        assert len(steps) == 1 and list(steps[0]['milestones']) == [27]
        assert steps[0]['by_epoch'] is True
        optimizer = cfg.optim_wrapper.optimizer
        assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == \
            ('AdamW', 1e-4, 0.1), name
        assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=64)
    else:
        assert tuple(backbone.out_indices) == (3, 5, 7, 11), name
        assert cfg.model.pretrained is None, name
        assert cfg.train_cfg.type == 'IterBasedTrainLoop', name
        assert cfg.train_cfg.max_iters == 160_000, name
        assert cfg.crop_size == (512, 512), name
        assert cfg.model.data_preprocessor.size == (512, 512), name
        assert cfg.model.decode_head.num_classes == 150, name


@pytest.mark.parametrize('det', ['mask_rcnn', 'cascade_mask_rcnn'])
def test_detector_architecture_as_the_authors(det):
    cfg = load(f'{det}_bpt')
    neck = cfg.model.neck
    assert neck.type == 'SimpleFeaturePyramid'
    assert (neck.in_channels, neck.out_channels) == (768, 256)
    assert tuple(neck.scale_factors) == (4.0, 2.0, 1.0, 0.5)
    assert neck.num_outs == 5 and neck.norm == 'LN'
    roi = cfg.model.roi_head
    heads = roi.bbox_head if isinstance(roi.bbox_head, list) \
        else [roi.bbox_head]
    assert len(heads) == (3 if det.startswith('cascade') else 1)
    for head in heads:
        assert head.type == 'Shared4Conv1FCBBoxHead'
        assert head.conv_out_channels == 256
        assert head.norm_cfg.type == 'LN2d'
    assert roi.mask_head.norm_cfg.type == 'LN2d'
    assert cfg.model.rpn_head.num_convs == 2
    # the LN2d heads really are LayerNorm (not silently another norm)
    model = built(f'{det}_bpt')
    from bpt_mm.models import LayerNorm2d
    n_ln = sum(isinstance(m, LayerNorm2d) for m in model.roi_head.modules())
    # per stage: 4 box convs and 4 mask convs (Cascade repeats the mask head)
    assert n_ln == len(heads) * (4 + 4)
    # eps as mmdet's ViTDet config gets it from build_norm_layer, heads and
    # pyramid alike
    assert {m.norm.eps for m in model.modules()
            if isinstance(m, LayerNorm2d)} == {1e-5}


@pytest.mark.parametrize('name', FULL)
def test_vit_b_prompt_params_on_meta_device(name):
    _, variant = parse_name(name)
    cfg = load(name)
    backbone_cfg = copy.deepcopy(cfg.model.backbone)
    backbone_cfg.pop('init_cfg')
    with torch.device('meta'):
        backbone = build(backbone_cfg, cfg.default_scope)
    assert isinstance(backbone, PromptedViT)
    assert backbone.embed_dims == 768 and backbone.num_layers == 12
    counts = trainable_parameters(backbone)
    got = counts['prompts']['trainable'] + counts['whitening']['trainable']
    assert got == VIT_B_PROMPT_PARAMS[variant], name
    assert got == sum(expected_prompt_counts(variant, 768, 100, 100)), name
    if variant == 'bpt':
        assert counts['prompts']['trainable'] == 100 * 100 + 768 * 100 \
            == 86_800
        assert counts['whitening']['trainable'] == 0


@pytest.mark.parametrize('name', TINY)
def test_tiny_settings(name):
    det, _ = parse_name(name)
    cfg = load(name)
    root = 'data/tiny/ade20k/' if det == 'upernet' else 'data/tiny/coco/'
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        assert cfg[loader].dataset.data_root == root, (name, loader)
        assert cfg[loader].num_workers == 0, (name, loader)
    assert cfg.train_cfg.type == 'IterBasedTrainLoop', name
    iters = cfg.train_cfg.max_iters
    assert 1 <= iters <= 60, name
    assert cfg.train_cfg.val_interval == iters, name
    assert cfg.default_hooks.checkpoint.by_epoch is False, name
    assert cfg.default_hooks.checkpoint.interval == iters, name
    assert 'SyncBN' not in cfg.pretty_text, name
    arch = cfg.model.backbone.arch
    assert (arch.embed_dims, arch.num_layers, arch.num_heads) == (64, 4, 4)
    if det == 'upernet':
        assert cfg.train_dataloader.dataset.type == 'ADE20KDataset'
        assert cfg.val_evaluator.type == 'IoUMetric'
        assert list(cfg.val_evaluator.iou_metrics) == ['mIoU']
        assert cfg.model.decode_head.num_classes == 150
        assert any(t.get('reduce_zero_label') for t in
                   cfg.train_dataloader.dataset.pipeline)
    else:
        assert cfg.val_evaluator.ann_file == \
            root + 'annotations/instances_val2017.json'


def _detection_batch(model: nn.Module, size: int):
    from mmdet.testing import demo_mm_inputs
    packed = demo_mm_inputs(2, [[3, size, size]] * 2, num_items=[2, 1],
                            num_classes=80, with_mask=True)
    return model.data_preprocessor(packed, True)


def _segmentation_batch(model: nn.Module, size: int):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(
            img_shape=(size, size), pad_shape=(size, size),
            ori_shape=(size, size)))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, 150, (1, size, size)))
        samples.append(sample)
    return dict(inputs=torch.rand(2, 3, size, size), data_samples=samples)


@pytest.mark.parametrize('name', ['mask_rcnn_bpt', 'cascade_mask_rcnn_bpt',
                                  'upernet_bpt'])
def test_main_configs_train_one_step_at_narrow_width(name):
    """The full-size architecture (windowed attention with prompts, the
    LayerNorm RoI heads, Feature2Pyramid) runs forward and backward; the
    gradients reach the prompts and nothing frozen."""
    torch.manual_seed(0)
    cfg = load(name)
    model_cfg = small_model_cfg(name, cfg)
    # no whitening hook runs here: train with the identity
    model_cfg.backbone.prompt.allow_identity_whitening = True
    if cfg.default_scope == 'mmdet':
        # 128 px is an 8x8 patch grid: 4x4 windows (not the configs' 14)
        # so that the windows really split it, with the configs' global
        # blocks in between
        assert model_cfg.backbone.window_size == 14
        model_cfg.backbone.window_size = 4
        model_cfg.train_cfg.rcnn = _replace_rcnn_samples(
            model_cfg.train_cfg.rcnn, 16)
        model = build(model_cfg, 'mmdet')
        data = _detection_batch(model, 128)
    else:
        model_cfg.data_preprocessor.size = (128, 128)
        model = build(model_cfg, 'mmseg')
        data = _segmentation_batch(model, 128)
    model.train()
    losses = model(**data, mode='loss')
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss), name
    loss.backward()
    for param_name, param in model.named_parameters():
        if param_name.startswith('backbone.') and \
                not param_name.startswith('backbone.prompts.'):
            assert param.grad is None, param_name
    prompt_grads = [p.grad for n, p in model.named_parameters()
                    if n.startswith('backbone.prompts.')]
    assert prompt_grads and all(
        g is not None and g.abs().sum() > 0 for g in prompt_grads), name


def _replace_rcnn_samples(rcnn: Any, num: int) -> Any:
    """Fewer sampled RoIs per image (one stage or a cascade of them)."""
    stages = rcnn if isinstance(rcnn, list) else [rcnn]
    for stage in stages:
        stage.sampler.num = num
    return rcnn


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory) -> str:
    from bpt_mm.testing.tiny_data import ensure_tiny_data
    root = str(tmp_path_factory.mktemp('tiny'))
    ensure_tiny_data(root, num_train=4, num_val=2)
    return root


@pytest.mark.parametrize('name', ['mask_rcnn_bpt', 'upernet_bpt'])
def test_full_size_data_pipelines_run_on_generated_data(name, tiny_data):
    """The COCO (1024 px large-scale jitter) and ADE20K (512 px crops)
    pipelines of the full-size configs, on the generated sets."""
    from mmengine.runner import Runner
    cfg = load(name)
    _registries()
    detection = cfg.default_scope == 'mmdet'
    root = osp.join(tiny_data, 'coco' if detection else 'ade20k') + '/'
    size = 1024 if detection else 512
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        for key in ('train_dataloader', 'val_dataloader'):
            loader_cfg = copy.deepcopy(cfg[key])
            loader_cfg.update(num_workers=0, persistent_workers=False,
                              batch_size=2)
            loader_cfg.dataset.data_root = root
            if detection:
                loader_cfg.dataset.metainfo = dict(
                    classes=('square', 'disk', 'triangle'))
            batch = next(iter(Runner.build_dataloader(loader_cfg)))
            shapes = [tuple(x.shape) for x in batch['inputs']]
            assert len(shapes) == 2, (name, key)
            for shape in shapes:
                assert shape[0] == 3 and max(shape[1:]) <= size, \
                    (name, key, shapes)
            if detection and key == 'train_dataloader':
                # padded to the fixed LSJ size, by the data preprocessor
                # (BatchFixedSizePad), as mmdet's ViTDet config does
                from mmdet.registry import MODELS as MMDET_MODELS
                preprocessor = MMDET_MODELS.build(
                    copy.deepcopy(cfg.model.data_preprocessor))
                inputs = preprocessor(batch, True)['inputs']
                assert tuple(inputs.shape) == (2, 3, size, size), \
                    (name, key, tuple(inputs.shape))


@pytest.mark.parametrize('det', ['mask_rcnn', 'cascade_mask_rcnn'])
def test_lsj_padding_keeps_img_shape_real(det):
    # The 1024x1024 padding of large-scale jitter is done by the data
    # preprocessor, so each sample's img_shape stays its real size and the
    # whitening/statistics hooks leave the padding out.
    from mmdet.registry import MODELS as MMDET_MODELS
    import numpy as np
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.registry import DefaultScope
    from mmengine.structures import InstanceData

    from bpt_mm.whitening.real_tokens import img_shapes_of, real_patch_mask
    cfg = load(f'{det}_bpt')
    types = [t['type'] for t in cfg.train_dataloader.dataset.pipeline]
    assert 'Pad' not in types, types
    with DefaultScope.overwrite_default_scope('mmdet'):
        preprocessor = MMDET_MODELS.build(
            copy.deepcopy(cfg.model.data_preprocessor))
    shapes = [(96, 80), (64, 112)]
    samples = []
    for h, w in shapes:
        sample = DetDataSample(metainfo=dict(img_shape=(h, w)))
        sample.gt_instances = InstanceData(
            bboxes=torch.zeros(1, 4),
            masks=BitmapMasks(np.zeros((1, h, w), np.uint8), h, w))
        samples.append(sample)
    data = dict(inputs=[torch.randint(0, 255, (3, h, w), dtype=torch.uint8)
                        for h, w in shapes], data_samples=samples)
    out = preprocessor(data, True)
    assert out['inputs'].shape[-2:] == (1024, 1024)
    assert img_shapes_of(out['data_samples']) == tuple(shapes)
    mask = real_patch_mask(img_shapes_of(out['data_samples']), (64, 64), 16,
                           2)
    assert mask.sum(1).tolist() == [6 * 5, 4 * 7]
    masks = [s.gt_instances.masks for s in out['data_samples']]
    assert all(m.height == m.width == 1024 for m in masks)
