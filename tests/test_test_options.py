"""tools/test.py's flags as mmdet's and mmseg's tools/test.py define them:
what --show, --show-dir, --wait-time, --out and --tta do to a config, and
no argparse prefix matching. Run end to end in tests/test_tools.py."""
import os.path as osp

import pytest
from mmengine.config import Config

from bpt_mm.launch import enable_visualization
from bpt_mm.test_options import add_prediction_output, enable_tta
from helpers import ROOT, load_tool

TINY = osp.join(ROOT, 'configs', 'tiny')


def tiny(family):
    cfg = Config.fromfile(osp.join(TINY, f'{family}_bpt_tiny.py'))
    cfg.work_dir = '/w'
    return cfg


def test_no_prefix_matching():
    test_tool, train_tool = load_tool('test'), load_tool('train')
    args = test_tool.parse_args(['c.py', 'k.pth', '--show', '--show-dir',
                                 'vis', '--wait-time', '0.5'])
    assert args.show and args.show_dir == 'vis' and args.wait_time == 0.5
    # `--show x` used to be read as `--show-dir x`; `--show-d` as well
    for argv in (['--show', 'x'], ['--show-d', 'x'], ['--wo', 'w']):
        with pytest.raises(SystemExit):
            test_tool.parse_args(['c.py', 'k.pth', *argv])
    with pytest.raises(SystemExit):
        train_tool.parse_args(['c.py', '--work', 'w'])


def test_show_and_show_dir():
    cfg = tiny('mask_rcnn')
    enable_visualization(cfg, 'vis', show=True, wait_time=0.5)
    vis = cfg.default_hooks.visualization
    # mmdet's hook joins it with work_dir/<timestamp>
    assert (vis.draw, vis.show, vis.wait_time, vis.test_out_dir) == \
        (True, True, 0.5, 'vis')
    cfg = tiny('upernet')
    enable_visualization(cfg, 'vis')
    assert cfg.default_hooks.visualization.interval == 1
    assert 'show' not in cfg.default_hooks.visualization
    assert cfg.visualizer.save_dir == '/w/vis'
    enable_visualization(cfg, '/abs/vis')
    assert cfg.visualizer.save_dir == '/abs/vis'
    with pytest.raises(ValueError, match='--wait-time'):
        enable_visualization(cfg, None, show=True, wait_time=-1)
    del cfg.default_hooks['visualization']
    with pytest.raises(ValueError, match='default_hooks.visualization'):
        enable_visualization(cfg, 'vis')


def test_out():
    cfg = tiny('mask_rcnn')
    with pytest.raises(ValueError, match=r'\.pkl'):
        add_prediction_output(cfg, 'preds')
    add_prediction_output(cfg, 'preds.pkl')
    metric, dump = cfg.test_evaluator
    assert metric.type == 'CocoMetric'
    assert dump == dict(type='DumpDetResults', out_file_path='preds.pkl')
    cfg = tiny('upernet')
    add_prediction_output(cfg, 'preds')
    assert cfg.test_evaluator.output_dir == 'preds'
    assert cfg.test_evaluator.keep_results is True


def test_tta():
    cfg = tiny('upernet')
    model = cfg.model
    enable_tta(cfg)
    assert cfg.model.type == 'SegTTAModel' and cfg.model.module == model
    assert cfg.test_dataloader.dataset.pipeline == cfg.tta_pipeline
    with pytest.raises(ValueError, match='mask_head'):
        enable_tta(tiny('mask_rcnn'))
    cfg = tiny('mask_rcnn')
    cfg.model.roi_head.mask_head = None
    with pytest.warns(UserWarning, match='tta_model'):
        enable_tta(cfg)
    assert cfg.model.type == 'DetTTAModel'
    flip = cfg.test_dataloader.dataset.pipeline[-1]
    assert flip.type == 'TestTimeAug'
    assert 'flip' in flip.transforms[1][0]['meta_keys']
