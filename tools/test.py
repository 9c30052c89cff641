"""Evaluate a checkpoint of a bpt_mm config (mmdet or mmseg).

The flags are those of mmdet's and mmseg's ``tools/test.py``; the config's
``default_scope`` decides which library's meaning applies where they
differ (``--out``). A checkpoint may be full or hold the trainable weights
only (prompts, whitening, neck, heads: see ``TrainableCheckpointHook``).
The frozen backbone is then loaded from the pretrained file the config's
backbone ``init_cfg`` names, and checked against the fingerprint the
checkpoint recorded; without one the test is refused rather than run on a
random backbone (mmengine's ``Runner.test`` never calls ``init_weights``).

Examples:
    python tools/test.py configs/mask_rcnn_bpt.py work_dirs/x/epoch_36.pth
    python tools/test.py CONFIG CKPT --show-dir vis    # WORK_DIR/<time>/vis
    python tools/test.py CONFIG CKPT --out preds.pkl   # mmdet: a pickle
    python tools/test.py CONFIG CKPT --out preds       # mmseg: a directory
    python tools/test.py CONFIG CKPT --tta
    bash tools/dist_test.sh CONFIG CKPT 8
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from bpt_mm.data_check import check_data_sets  # noqa: E402
from bpt_mm.engine.checkpoint_hooks import \
    TRAINABLE_CHECKPOINT_HOOK_TYPES  # noqa: E402
from bpt_mm.launch import (add_common_arguments,  # noqa: E402
                           build_runner, check_checkpoint_covers_model,
                           check_data_paths, config_from_args,
                           enable_visualization)
from bpt_mm.models.checkpoint_source import is_local_path  # noqa: E402
from bpt_mm.test_options import add_prediction_output, enable_tta  # noqa
from bpt_mm.utils import find_hook_entry  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    # allow_abbrev=False: `--show x` must not be taken for `--show-dir x`.
    parser = argparse.ArgumentParser(description='Test a bpt_mm model',
                                     allow_abbrev=False)
    parser.add_argument('config', help='test config file path')
    parser.add_argument(
        'checkpoint', help='checkpoint file, URL or file-backend name '
        '(s3://...), read as load_from reads it')
    add_common_arguments(parser, 'test_dataloader.batch_size=1')
    parser.add_argument(
        '--out', help='keep the predictions: mmdet, a .pkl file for offline '
        'evaluation; mmseg, a directory of predicted masks')
    parser.add_argument('--show', action='store_true',
                        help='show the predictions in a window')
    parser.add_argument(
        '--show-dir', help='draw the predictions into this directory, under '
        'the work dir (mmdet: WORK_DIR/<timestamp>/SHOW_DIR, mmseg: '
        'WORK_DIR/SHOW_DIR) unless absolute')
    parser.add_argument('--wait-time', type=float, default=2,
                        help='seconds each --show window stays up')
    parser.add_argument('--tta', action='store_true',
                        help='test-time augmentation (the config\'s '
                        '`tta_model` and `tta_pipeline`)')
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    # After the config: its custom_imports may register file backends.
    cfg = config_from_args(args)
    if is_local_path(args.checkpoint) and not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint file not found: '
                                f'{args.checkpoint!r}')
    cfg.load_from = args.checkpoint
    cfg.resume = False
    if find_hook_entry(cfg, TRAINABLE_CHECKPOINT_HOOK_TYPES) is None:
        # The guard that completes (or refuses) a checkpoint without the
        # frozen backbone; it never changes a full checkpoint.
        cfg.setdefault('custom_hooks', []).append(
            dict(type='TrainableCheckpointHook', save_trainable_only=False))
    if args.show or args.show_dir:
        enable_visualization(cfg, args.show_dir, args.show, args.wait_time)
    if args.out is not None:
        add_prediction_output(cfg, args.out)
    if args.tta:
        enable_tta(cfg)
    check_data_paths(cfg, ['test_dataloader'])
    check_data_sets(cfg, ['test_dataloader'])
    runner = build_runner(cfg)
    check_checkpoint_covers_model(runner.model, args.checkpoint)
    return runner.test()


if __name__ == '__main__':
    main()
