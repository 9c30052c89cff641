"""What ``tools/test.py``'s ``--out`` and ``--tta`` do to a config, as
mmdet's and mmseg's own ``tools/test.py`` define them (``--show``,
``--show-dir`` and ``--wait-time``: see
:func:`bpt_mm.launch.enable_visualization`).

* ``--out``: mmdet dumps the predictions to a pickle file
  (``DumpDetResults``), mmseg writes the predicted masks to a directory
  (``test_evaluator.output_dir``) (:func:`add_prediction_output`).
* ``--tta``: test-time augmentation with the config's ``tta_model`` and
  ``tta_pipeline`` (:func:`enable_tta`).
"""
import copy
import warnings

from mmengine.config import Config, ConfigDict


def add_prediction_output(cfg: Config, out: str) -> None:
    """``--out``: keep the predictions.

    mmdet: ``out`` is a ``.pkl``/``.pickle`` file, written by a
    ``DumpDetResults`` metric appended to ``test_evaluator``. mmseg:
    ``out`` is a directory that receives one predicted mask per image
    (``test_evaluator.output_dir``, with ``keep_results=True``).

    Raises:
        ValueError: mmdet and ``out`` is not a pickle file name; or the
            config has no ``test_evaluator``.
    """
    evaluator = cfg.get('test_evaluator')
    if evaluator is None:
        raise ValueError('--out needs `test_evaluator` in the config')
    if cfg.default_scope == 'mmdet':
        if not out.endswith(('.pkl', '.pickle')):
            raise ValueError(f'--out must name a .pkl or .pickle file (mmdet '
                             f'dumps its predictions there), got {out!r}')
        dump = dict(type='DumpDetResults', out_file_path=out)
        cfg.test_evaluator = (list(evaluator) if isinstance(
            evaluator, (list, tuple)) else [evaluator]) + [dump]
        return
    if isinstance(evaluator, (list, tuple)):
        raise ValueError('--out with mmseg needs one `test_evaluator` (an '
                         'IoUMetric), got a list')
    evaluator['output_dir'] = out
    evaluator['keep_results'] = True


def _innermost_dataset(cfg: Config) -> dict:
    dataset = cfg.test_dataloader.dataset
    while 'dataset' in dataset:
        dataset = dataset['dataset']
    return dataset


def enable_tta(cfg: Config) -> None:
    """``--tta``: wrap the model in ``cfg.tta_model`` and give the test
    set ``cfg.tta_pipeline``.

    mmseg's bases define both (``SegTTAModel``, multi-scale and flip). For
    mmdet, a config without them gets mmdet's defaults, with a warning as
    in mmdet: ``DetTTAModel`` (NMS at IoU 0.5, 100 boxes) over the test
    pipeline with and without a horizontal flip.

    Raises:
        ValueError: An mmseg config without ``tta_model`` or
            ``tta_pipeline``; an mmdet model with a mask head, whose
            predictions ``DetTTAModel`` cannot merge.
    """
    dataset = _innermost_dataset(cfg)
    if cfg.default_scope == 'mmseg':
        missing = [k for k in ('tta_model', 'tta_pipeline') if k not in cfg]
        if missing:
            raise ValueError(f'--tta needs {missing} in the config (mmseg\'s '
                             f"'mmseg::_base_/default_runtime.py' and "
                             f'dataset bases define them)')
        dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
        return
    if cfg.model.get('roi_head', {}).get('mask_head') is not None:
        raise ValueError(
            "--tta: mmdet's DetTTAModel merges boxes only and cannot merge "
            'instance masks; this model has `model.roi_head.mask_head`')
    if 'tta_model' not in cfg:
        warnings.warn('--tta: the config has no `tta_model`; using mmdet\'s '
                      "default DetTTAModel (nms iou_threshold=0.5, "
                      'max_per_img=100)')
        cfg.tta_model = dict(type='DetTTAModel', tta_cfg=dict(
            nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
    if 'tta_pipeline' not in cfg:
        warnings.warn('--tta: the config has no `tta_pipeline`; using the '
                      'test pipeline with and without a horizontal flip')
        pipeline = copy.deepcopy(dataset.pipeline)
        pack = dict(pipeline[-1])
        keys = tuple(pack.get('meta_keys', (
            'img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')))
        pack['meta_keys'] = keys + tuple(
            k for k in ('flip', 'flip_direction') if k not in keys)
        pipeline[-1] = dict(type='TestTimeAug', transforms=[
            [dict(type='RandomFlip', prob=1.),
             dict(type='RandomFlip', prob=0.)],
            [pack]])
        cfg.tta_pipeline = pipeline
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    if 'batch_shapes_cfg' in dataset:
        dataset.batch_shapes_cfg = None
    dataset.pipeline = cfg.tta_pipeline
