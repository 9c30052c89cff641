"""Evaluate a checkpoint of a bpt_mm config (mmdet or mmseg).

A checkpoint may be full or hold the trainable weights only (prompts,
whitening, neck, heads: see ``TrainableCheckpointHook``). The frozen
backbone is then loaded from the pretrained file the config's backbone
``init_cfg`` names, and checked against the fingerprint the checkpoint
recorded; without one the test is refused rather than run on a random
backbone (mmengine's ``Runner.test`` never calls ``init_weights``).

Examples:
    python tools/test.py configs/mask_rcnn_bpt.py work_dirs/x/epoch_36.pth
    python tools/test.py CONFIG CKPT --show-dir vis
    bash tools/dist_test.sh CONFIG CKPT 8
"""
import argparse
import os
import os.path as osp
import sys

from mmengine.config import DictAction

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from bpt_mm.engine.checkpoint_hooks import \
    TRAINABLE_CHECKPOINT_HOOK_TYPES  # noqa: E402
from bpt_mm.launch import (LAUNCHERS, build_runner,  # noqa: E402
                           default_work_dir, enable_visualization, has_hook,
                           load_config, setup_launcher)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test a bpt_mm model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where logs and metrics go '
                        '(default: ./work_dirs/<config name>)')
    parser.add_argument('--show-dir', help='draw the predictions into this '
                        'directory')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config keys, e.g. test_dataloader.batch_size=1')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none',
                        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint file not found: '
                                f'{args.checkpoint!r}')
    cfg = load_config(args.config, args.cfg_options)
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or \
        default_work_dir(args.config)
    setup_launcher(cfg, args.launcher)
    cfg.load_from = args.checkpoint
    cfg.resume = False
    if not has_hook(cfg, TRAINABLE_CHECKPOINT_HOOK_TYPES):
        # The guard that completes (or refuses) a checkpoint without the
        # frozen backbone; it never changes a full checkpoint.
        cfg.setdefault('custom_hooks', []).append(
            dict(type='TrainableCheckpointHook', save_trainable_only=False))
    if args.show_dir:
        enable_visualization(cfg, args.show_dir)
    runner = build_runner(cfg)
    return runner.test()


if __name__ == '__main__':
    main()
