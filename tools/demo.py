"""`make demo`: train and evaluate a tiny BPT Mask R-CNN on generated data.

1. Generates the tiny COCO-format data set under data/tiny (once).
2. Pretrains the tiny 4-block ViT on a proxy task over the generated
   training images (bpt_mm.testing.tiny_pretrain; once, saved as
   data/tiny/pretrained/tiny_vit_shapes.pth): no real pretrained weights
   exist for so small a ViT, and a frozen backbone should have learned
   something.
3. Trains configs/tiny/mask_rcnn_bpt_tiny.py with that backbone loaded
   frozen through `init_cfg=dict(type='Pretrained', ...)` (shallow
   BPT-bilinear prompts, simple feature pyramid, Mask R-CNN heads) for its
   short schedule on the CPU, evaluating once at the end.
4. Prints bbox/segm AP, where the checkpoint is, and draws the predictions on
   one validation image.

Usage: python tools/demo.py [--work-dir work_dirs/demo] [--max-iters N]
"""
import argparse
import os
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config',
                        default=osp.join(ROOT, 'configs', 'tiny',
                                         'mask_rcnn_bpt_tiny.py'),
                        help='default: configs/tiny/mask_rcnn_bpt_tiny.py')
    parser.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs',
                                                       'demo'),
                        help='default: work_dirs/demo of the checkout')
    parser.add_argument('--data-root', default=osp.join(ROOT, 'data', 'tiny'),
                        help='the generated data (made when missing); '
                        'default: data/tiny of the checkout')
    parser.add_argument('--max-iters', type=int, default=None,
                        help='override the config schedule (iterations)')
    args = parser.parse_args()
    if args.max_iters is not None and args.max_iters <= 0:
        parser.error(f'--max-iters must be a positive int, got '
                     f'{args.max_iters}')
    return args


def main() -> int:
    args = parse_args()
    from mmengine.config import Config
    from mmengine.runner import Runner

    from bpt_mm.testing.tiny_data import MANIFEST_NAME, ensure_tiny_data
    from bpt_mm.testing.tiny_pretrain import ensure_tiny_pretrained

    data = ensure_tiny_data(args.data_root)
    coco = data['coco']
    print(f"[demo] data: {coco['root']} "
          f"({'generated' if coco['generated'] else 'up to date'})")

    cfg = Config.fromfile(args.config)
    cfg.work_dir = args.work_dir
    coco_root = coco['root'].rstrip('/') + '/'
    backbone_file = osp.join(args.data_root, 'pretrained',
                             'tiny_vit_shapes.pth')
    preprocessor = cfg.model.data_preprocessor
    pretrained = ensure_tiny_pretrained(
        backbone_file, cfg.model.backbone, coco['train_img_dir'],
        coco['train_ann_file'], preprocessor.mean, preprocessor.std,
        data_manifest=osp.join(coco['root'], MANIFEST_NAME))
    print(f"[demo] pretrained tiny ViT: {pretrained['path']} "
          f"({'pretrained now' if pretrained['generated'] else 'up to date'}"
          f"; proxy cell accuracy on foreground "
          f"{pretrained['meta']['foreground_cell_accuracy']:.2f})")
    cfg.model.backbone.init_cfg = dict(type='Pretrained',
                                       checkpoint=pretrained['path'])
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = coco_root
    for evaluator in ('val_evaluator', 'test_evaluator'):
        cfg[evaluator].ann_file = osp.join(
            coco_root, 'annotations', 'instances_val2017.json')
    if args.max_iters is not None:
        cfg.train_cfg.max_iters = args.max_iters
        cfg.default_hooks.checkpoint.interval = args.max_iters
    # Evaluate once, below, rather than also inside the training loop:
    # mmengine's IterBasedTrainLoop validates after the last iteration
    # whatever val_interval is, unless validation has not begun yet.
    cfg.train_cfg.val_interval = cfg.train_cfg.max_iters + 1
    cfg.train_cfg.val_begin = cfg.train_cfg.max_iters + 1

    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.val_loop.run()
    ckpt = osp.join(cfg.work_dir, f'iter_{cfg.train_cfg.max_iters}.pth')

    vis_path = osp.join(cfg.work_dir, 'demo_prediction.jpg')
    draw_prediction(runner, vis_path)

    print('\n[demo] results on the generated validation set '
          f"({coco['num_images']['val']} images):")
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP',
                'coco/segm_mAP_50'):
        print(f'  {key:<18} {metrics.get(key, float("nan")):.3f}')
    print(f'[demo] checkpoint: {ckpt}')
    print(f'[demo] visualised prediction: {vis_path}')
    return 0


def draw_prediction(runner, out_path: str) -> None:
    """Run the trained model on the first validation image and draw it."""
    import mmcv
    from mmdet.apis import inference_detector
    from mmdet.visualization import DetLocalVisualizer

    model = runner.model
    model.cfg = runner.cfg
    dataset = runner.val_dataloader.dataset
    img_path = dataset.get_data_info(0)['img_path']
    result = inference_detector(model, img_path)
    visualizer = DetLocalVisualizer.get_instance(
        'bpt_mm_demo', vis_backends=[dict(type='LocalVisBackend')],
        save_dir=osp.dirname(out_path))
    visualizer.dataset_meta = dataset.metainfo
    image = mmcv.imread(img_path, channel_order='rgb')
    visualizer.add_datasample('prediction', image, result, draw_gt=False,
                              pred_score_thr=0.3, out_file=out_path)


if __name__ == '__main__':
    os.environ.setdefault('OMP_NUM_THREADS', str(os.cpu_count() or 1))
    sys.exit(main())
