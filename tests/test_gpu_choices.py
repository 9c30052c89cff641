"""What --amp and the distributed launch choose on a GPU machine, checked
without one: torch's CUDA queries are replaced by monkeypatch."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from bpt_mm import launch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def fake_gpus(monkeypatch, count=1, native_bf16=True):
    """Pretend ``count`` GPUs of an arch with (9.0) or without (7.0)
    native bf16."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: count > 0)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: count)
    monkeypatch.setattr(torch.cuda, 'get_device_capability',
                        lambda *a: (9, 0) if native_bf16 else (7, 0))
    # torch's own check also counts emulated bf16: it must not be asked
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, 'get_device_name',
                        lambda *a: 'Fake V100' if not native_bf16 else 'H200')


def sgd_config(**wrapper):
    return Config(dict(optim_wrapper=dict(
        type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1), **wrapper)))


@pytest.mark.parametrize('native_bf16,expected', [(True, 'bfloat16'),
                                                  (False, 'float16')])
def test_amp_chooses_bf16_only_where_native(monkeypatch, native_bf16,
                                            expected):
    fake_gpus(monkeypatch, native_bf16=native_bf16)
    cfg = sgd_config()
    launch.enable_amp(cfg)
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.dtype == expected
    assert cfg.optim_wrapper.loss_scale == 'dynamic'


def test_amp_dtype_option_overrides_the_choice(monkeypatch):
    fake_gpus(monkeypatch, native_bf16=True)
    cfg = sgd_config()
    launch.enable_amp(cfg, 'fp16')
    assert cfg.optim_wrapper.dtype == 'float16'


def test_amp_bf16_refused_without_native_bf16(monkeypatch):
    fake_gpus(monkeypatch, native_bf16=False)
    with pytest.raises(ValueError, match='Fake V100 has no native bf16'):
        launch.enable_amp(sgd_config(), 'bf16')
    with pytest.raises(ValueError, match='--amp-dtype must be one of'):
        launch.amp_dtype('float8')


def test_amp_keeps_a_configured_dtype_and_refuses_a_contradiction(
        monkeypatch):
    fake_gpus(monkeypatch, native_bf16=True)
    cfg = sgd_config(dtype='float16')
    launch.enable_amp(cfg)
    assert cfg.optim_wrapper.dtype == 'float16'
    cfg = sgd_config(dtype='float16')
    with pytest.raises(ValueError, match="optim_wrapper.dtype='float16'"):
        launch.enable_amp(cfg, 'bf16')


def test_models_with_roi_heads_get_fp16(monkeypatch):
    # mmcv 2.1's RoIAlign CUDA kernels have no bf16: Mask R-CNN gets fp16
    # on a bf16 GPU, UperNet bf16.
    fake_gpus(monkeypatch, native_bf16=True)
    tiny = osp.join(ROOT, 'configs', 'tiny')
    mask_rcnn = Config.fromfile(osp.join(tiny, 'mask_rcnn_bpt_tiny.py'))
    launch.enable_amp(mask_rcnn)
    assert mask_rcnn.optim_wrapper.dtype == 'float16'
    with pytest.raises(ValueError, match="mmcv's RoIAlign"):
        launch.enable_amp(Config.fromfile(
            osp.join(tiny, 'cascade_mask_rcnn_bpt_tiny.py')), 'bf16')
    upernet = Config.fromfile(osp.join(tiny, 'upernet_bpt_tiny.py'))
    launch.enable_amp(upernet)
    assert upernet.optim_wrapper.dtype == 'bfloat16'


def test_amp_dtype_without_amp_is_refused(monkeypatch):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'bpt_mm_tool_train_amp', osp.join(ROOT, 'tools', 'train.py'))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    config = osp.join(ROOT, 'configs', 'tiny', 'mask_rcnn_bpt_tiny.py')
    with pytest.raises(ValueError, match='--amp-dtype only applies with'):
        train.main([config, '--amp-dtype', 'fp16'])
    with pytest.raises(SystemExit):
        train.parse_args([config, '--amp', '--amp-dtype', 'fp8'])


def test_gpus_get_nccl_and_one_process_each(monkeypatch):
    fake_gpus(monkeypatch, count=2)
    monkeypatch.setenv('LOCAL_RANK', '1')
    cfg = Config(dict())
    launch.setup_launcher(cfg, 'pytorch')
    assert cfg.env_cfg.dist_cfg.backend == 'nccl'
    assert cfg.launcher == 'pytorch'
    assert 'model_wrapper_cfg' not in cfg  # mmengine's DDP on the GPU
    # a config's own backend choice stands
    cfg = Config(dict(env_cfg=dict(dist_cfg=dict(backend='gloo'))))
    launch.setup_launcher(cfg, 'pytorch')
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    monkeypatch.setenv('LOCAL_RANK', '2')
    with pytest.raises(RuntimeError, match='this node has 2 GPU'):
        launch.setup_launcher(Config(dict()), 'pytorch')


def test_a_configured_amp_dtype_is_checked_like_the_option(monkeypatch):
    """A config's own ``optim_wrapper.dtype`` is kept under --amp, but not a
    bf16 that mmcv's RoIAlign (no bf16 CUDA kernel) or a GPU without native
    bf16 could not run, nor a value AmpOptimWrapper does not take; each is
    refused naming ``optim_wrapper.dtype`` before training."""
    fake_gpus(monkeypatch, native_bf16=True)
    tiny = osp.join(ROOT, 'configs', 'tiny')
    mask_rcnn = Config.fromfile(osp.join(tiny, 'mask_rcnn_bpt_tiny.py'))
    mask_rcnn.optim_wrapper.dtype = 'bfloat16'
    with pytest.raises(ValueError, match=r"optim_wrapper\.dtype='bfloat16'"
                       r".*RoIAlign"):
        launch.enable_amp(mask_rcnn)
    cfg = sgd_config(dtype=torch.bfloat16)  # a torch dtype is taken too
    launch.enable_amp(cfg)
    assert cfg.optim_wrapper.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"optim_wrapper\.dtype must be one "
                       r"of \['bfloat16', 'float16'\].*'fp16'"):
        launch.enable_amp(sgd_config(dtype='fp16'))
    fake_gpus(monkeypatch, native_bf16=False)
    with pytest.raises(ValueError, match=r"optim_wrapper\.dtype='bfloat16'"
                       r": Fake V100 has no native bf16"):
        launch.enable_amp(sgd_config(dtype='bfloat16'))
