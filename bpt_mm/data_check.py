"""Check a data set's files against its annotations before anything is built.

mmdet and mmseg meet a broken data set late and obscurely: a truncated
annotation JSON fails in a json reader, a set whose images are all filtered
out ends in mmengine's "need at least one array to concatenate", an image
file whose real size differs from the JSON's ``width``/``height`` trains to
``loss_bbox: nan``, and a mask with values beyond the classes trains on
garbage. :func:`check_data_sets` reads what a config's data loaders name
(COCO-format instance sets and mmseg's ``ADE20KDataset``) and refuses each
of these with the file and the problem.

Image sizes are read from the file headers (Pillow), not by decoding, so a
COCO-sized set is checked in seconds; mask values need the pixels, so at
most ``max_masks_decoded`` masks per set are decoded (the log says how many).
"""
import importlib
import json
import os
import os.path as osp
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np

#: EXIF orientations that swap width and height when applied.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)

#: ``color_type`` values of ``LoadImageFromFile`` under which mmcv's
#: ``imfrombytes`` applies the EXIF orientation (cv2's IMREAD_COLOR and
#: IMREAD_GRAYSCALE do; with Pillow, mmcv calls ``ImageOps.exif_transpose``
#: for these two flags). ``'unchanged'`` and ``'*_ignore_orientation'``
#: keep the stored pixels.
_ORIENTING_COLOR_TYPES = ('color', 'grayscale')


class DataSetError(ValueError):
    """A data set contradicts itself or its config; the message names the
    config key and the file."""


def _joined(root: str, path: str) -> str:
    return path if osp.isabs(path) or not root else osp.join(root, path)


def _dataset_entries(dataset: Any, key: str) -> Iterator[Tuple[str, dict]]:
    """``(config key, dataset dict)`` of every leaf data set, through the
    ``dataset``/``datasets`` wrappers."""
    if not isinstance(dataset, dict) or dataset.get('backend_args'):
        return
    inner = dataset.get('dataset')
    if isinstance(inner, dict):
        yield from _dataset_entries(inner, f'{key}.dataset')
        return
    parts = dataset.get('datasets')
    if isinstance(parts, (list, tuple)) and parts:
        for i, part in enumerate(parts):
            yield from _dataset_entries(part, f'{key}.datasets[{i}]')
        return
    yield key, dataset


def _applies_orientation(dataset: dict) -> bool:
    """Whether the data set's ``LoadImageFromFile`` (mmcv/mmdet/mmseg; its
    ``color_type`` defaults to ``'color'``) turns images by their EXIF
    orientation, i.e. whether the pipeline sees the displayed size."""
    pipeline = dataset.get('pipeline')
    for step in pipeline if isinstance(pipeline, (list, tuple)) else ():
        if isinstance(step, dict) and str(step.get('type', '')).endswith(
                'LoadImageFromFile'):
            return step.get('color_type', 'color') in _ORIENTING_COLOR_TYPES
    return True  # no loader named: the default color_type, 'color'


def _image_size(path: str) -> Tuple[int, int, bool]:
    """``(width, height, transposable)`` from the file header (the stored
    size), where ``transposable`` says its EXIF orientation swaps the two
    when applied."""
    from PIL import Image
    with Image.open(path) as img:
        width, height = img.size
        try:
            orientation = img.getexif().get(0x0112)
        except Exception:  # noqa: BLE001 (no or broken EXIF: no rotation)
            orientation = None
    return width, height, orientation in _TRANSPOSING_ORIENTATIONS


def _check_image_file(key: str, path: str,
                      expected: Optional[Tuple[int, int]] = None,
                      oriented: bool = False) -> Tuple[int, int]:
    """Refuse a missing, empty or unreadable image, or one whose size as
    loaded is not ``expected`` (width, height); return the size as loaded.

    ``oriented``: the loader applies the EXIF orientation (mmcv's
    ``imfrombytes`` with ``'color'``), so a file stored 160x128 with
    orientation 6 loads 128x160, and its annotations (boxes, polygons,
    width/height) must be of that size; listing the stored size would put
    every box on the wrong pixels without any error.
    """
    if not osp.isfile(path):
        raise DataSetError(f'{key}: image file {path!r} does not exist')
    if osp.getsize(path) == 0:
        raise DataSetError(f'{key}: image file {path!r} is empty (0 bytes)')
    try:
        width, height, transposable = _image_size(path)
    except Exception as exc:  # noqa: BLE001 (named in the message)
        raise DataSetError(f'{key}: image file {path!r} cannot be read as '
                           f'an image: {exc}') from None
    turned = oriented and transposable
    if turned:
        width, height = height, width
    if expected is not None and (width, height) != tuple(expected):
        if turned and (height, width) == tuple(expected):
            raise DataSetError(
                f'{key}: image file {path!r} is stored {height}x{width} '
                f'(width x height) with an EXIF orientation that turns it '
                f'to {width}x{height} when loaded (LoadImageFromFile '
                f"color_type 'color'), but the annotations say "
                f'{expected[0]}x{expected[1]}, the stored size: boxes and '
                'masks would not match the loaded pixels. If the '
                'annotations are of the stored pixels, set '
                "`color_type='color_ignore_orientation'` in "
                'LoadImageFromFile; if of the displayed image, fix '
                'width/height in the JSON')
        how = ', as loaded, after its EXIF orientation' if turned else ''
        raise DataSetError(
            f'{key}: image file {path!r} is {width}x{height} (width x '
            f'height{how}) but the annotations say '
            f'{expected[0]}x{expected[1]}; '
            'boxes and masks would not match the pixels (training gives '
            'NaN losses). Fix the file or its width/height in the JSON')
    return width, height


def _read_json(key: str, path: str) -> Any:
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as exc:
        raise DataSetError(f'{key}: cannot read {path!r}: {exc}') from None
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise DataSetError(
            f'{key}: {path!r} is not valid JSON: {exc.msg} at line '
            f'{exc.lineno}, column {exc.colno} (byte {exc.pos} of '
            f'{len(data)}; a truncated file ends like this)') from None
    except UnicodeDecodeError as exc:
        raise DataSetError(f'{key}: {path!r} is not a JSON text file: '
                           f'{exc}') from None


def _dataset_classes(dataset: dict,
                     scope: Optional[str] = None) -> Optional[Sequence[str]]:
    """The classes the data set keeps: its ``metainfo.classes`` or its
    class's default in library ``scope`` (None when unknown)."""
    metainfo = dataset.get('metainfo')
    if isinstance(metainfo, dict) and metainfo.get('classes'):
        return list(metainfo['classes'])
    kind = dataset.get('type')
    if not isinstance(kind, str) or scope not in ('mmdet', 'mmseg'):
        return None
    try:
        importlib.import_module(f'{scope}.datasets')
        registry = importlib.import_module(f'{scope}.registry').DATASETS
        cls = registry.get(kind.split('.')[-1])
    except Exception:  # noqa: BLE001 (an unknown type: no default)
        cls = None
    classes = getattr(cls, 'METAINFO', {}).get('classes') if cls else None
    return list(classes) if classes else None


def check_coco_set(key: str, dataset: dict, training: bool,
                   scope: Optional[str] = None) -> int:
    """Check a COCO-format instance set; return how many images it lists.

    Args:
        key (str): The config key of the data set, for messages.
        dataset (dict): Its config (``data_root``, ``ann_file``,
            ``data_prefix.img``, ``metainfo``, ``filter_cfg``).
        training (bool): Whether it is a training set (empty sets, images
            without annotations and filtering matter there).
        scope (str, optional): ``'mmdet'``: where the data set's default
            classes come from when the config sets no ``metainfo``.

    Raises:
        DataSetError: Naming the file and the problem.
    """
    root = dataset.get('data_root') or ''
    ann_path = _joined(root, dataset['ann_file'])
    ann_key = f'{key}.ann_file'
    coco = _read_json(ann_key, ann_path)
    if not isinstance(coco, dict):
        raise DataSetError(f'{ann_key}: {ann_path!r} holds a JSON '
                           f'{type(coco).__name__}, not a COCO dict with '
                           '`images`, `annotations` and `categories`')
    images = coco.get('images')
    if not isinstance(images, list) or not images:
        raise DataSetError(f'{ann_key}: {ann_path!r} has no `images` (or '
                           'an empty list); nothing to train or test on')
    annotations = coco.get('annotations')
    if training and (not isinstance(annotations, list) or not annotations):
        raise DataSetError(f'{ann_key}: {ann_path!r} has no `annotations`; '
                           'a training set needs objects to learn')
    annotations = annotations if isinstance(annotations, list) else []
    categories = coco.get('categories') or []
    classes = _dataset_classes(dataset, scope)
    known = {c.get('id') for c in categories if isinstance(c, dict) and (
        classes is None or c.get('name') in classes)}
    if training and not known:
        names = [c.get('name') for c in categories if isinstance(c, dict)]
        raise DataSetError(
            f'{ann_key}: none of the categories of {ann_path!r} '
            f'({names[:10]}) is a class of the data set ({classes}); set '
            f'`metainfo.classes` to the category names')
    with_objects = {a.get('image_id') for a in annotations
                    if isinstance(a, dict) and a.get('category_id') in known}
    if training and not with_objects & {
            im.get('id') for im in images if isinstance(im, dict)}:
        raise DataSetError(
            f'{ann_key}: no image of {ann_path!r} has an annotation of a '
            f'class of the data set ({classes}); nothing to learn')
    for image in images:
        # mmdet's CocoDataset reads both (parse_data_info, filter_data): a
        # missing one is a KeyError, a string a TypeError deep in loading.
        sizes = [image.get(k) if isinstance(image, dict) else None
                 for k in ('width', 'height')]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                   and v == v and v >= 1 for v in sizes):
            raise DataSetError(
                f'{ann_key}: an entry of `images` in {ann_path!r} has no '
                f'positive numeric `width` and `height` (got {sizes}): '
                f'{str(image)[:200]}')
    filter_cfg = dataset.get('filter_cfg')
    if training and isinstance(filter_cfg, dict):
        # mmdet's CocoDataset.filter_data: images without objects of the
        # classes go when filter_empty_gt, smaller ones always.
        empty_out = filter_cfg.get('filter_empty_gt', False)
        min_size = filter_cfg.get('min_size', 0) or 0
        kept = [im for im in images if isinstance(im, dict)
                and (not empty_out or im.get('id') in with_objects)
                and min(im.get('width', 0), im.get('height', 0)) >= min_size]
        if not kept:
            raise DataSetError(
                f'{ann_key}: all {len(images)} images of {ann_path!r} are '
                f'filtered out by `{key}.filter_cfg` ({filter_cfg}): none '
                f'with objects of the classes is at least {min_size} pixels '
                'on its shorter side; the data set would be empty')
    prefix = (dataset.get('data_prefix') or {}).get('img', '')
    img_root = _joined(root, prefix)
    oriented = _applies_orientation(dataset)
    for image in images:
        name = image.get('file_name') if isinstance(image, dict) else None
        if not isinstance(name, str) or not name:
            raise DataSetError(f'{ann_key}: an entry of `images` in '
                               f'{ann_path!r} has no file_name: {image!r}')
        expected = (image['width'], image['height'])  # checked above
        _check_image_file(f'{key}.data_prefix.img', osp.join(img_root, name),
                          expected, oriented)
    return len(images)


def _mask_values_allowed(dataset: dict,
                         scope: Optional[str]) -> Tuple[int, int]:
    """``(largest class value, ignore value)`` a mask may hold."""
    classes = _dataset_classes(dataset, scope)
    num = len(classes) if classes else 150
    kind = str(dataset.get('type', ''))
    reduce_zero = dataset.get('reduce_zero_label',
                              kind.endswith('ADE20KDataset'))
    return (num if reduce_zero else num - 1), 255


def check_segmentation_set(key: str, dataset: dict,
                           max_masks_decoded: int = 1000,
                           scope: Optional[str] = 'mmseg') -> Tuple[int, int]:
    """Check an ADE20K-layout set (mmseg's ``ADE20KDataset``: ``.jpg``
    images, ``.png`` masks of the same name); return (images, masks
    decoded).

    Every image needs its mask (same name, ``seg_map_suffix``), non-empty and
    of the image's size; the masks' values must be classes (or 255, the
    ignore value).

    Raises:
        DataSetError: Naming the file and the problem.
    """
    root = dataset.get('data_root') or ''
    prefix = dataset.get('data_prefix') or {}
    img_dir = _joined(root, prefix.get('img_path', ''))
    seg_dir = _joined(root, prefix.get('seg_map_path', ''))
    img_suffix = dataset.get('img_suffix', '.jpg')
    seg_suffix = dataset.get('seg_map_suffix', '.png')
    names = sorted(
        osp.relpath(osp.join(d, f), img_dir)
        for d, _, files in os.walk(img_dir) for f in files
        if f.endswith(img_suffix))
    if not names:
        raise DataSetError(f'{key}.data_prefix.img_path: {img_dir!r} holds '
                           f'no {img_suffix} images')
    largest, ignore = _mask_values_allowed(dataset, scope)
    # The image as the pipeline loads it (EXIF-turned under 'color'); masks
    # as mmseg's LoadAnnotations does, with 'unchanged' (never turned).
    oriented = _applies_orientation(dataset)
    decoded = 0
    for name in names:
        image = osp.join(img_dir, name)
        width, height = _check_image_file(f'{key}.data_prefix.img_path',
                                          image, oriented=oriented)
        mask = osp.join(seg_dir, name[:-len(img_suffix)] + seg_suffix)
        mask_key = f'{key}.data_prefix.seg_map_path'
        mw, mh = _check_image_file(mask_key, mask)
        if (mw, mh) != (width, height):
            raise DataSetError(
                f'{mask_key}: mask {mask!r} is {mw}x{mh} but its image '
                f'{image!r} is {width}x{height} as loaded (after any EXIF '
                f'orientation); labels would not match the '
                'pixels')
        from PIL import Image
        with Image.open(mask) as img:  # the header only
            bands = img.getbands()
        if len(bands) > 1:
            # mmseg's LoadAnnotations reads masks 'unchanged': a colour mask
            # stays (H, W, C) and PackSegInputs only warns about its shape.
            raise DataSetError(
                f'{mask_key}: mask {mask!r} has {len(bands)} channels '
                f'({"".join(bands)}); a label mask has one (class indices, '
                'mode L, P or I;16). Is it a colour rendering of the labels?')
        if decoded < max_masks_decoded:
            with Image.open(mask) as img:
                values = np.unique(np.asarray(img))
            decoded += 1
            bad = [int(v) for v in values if v > largest and v != ignore]
            if bad:
                raise DataSetError(
                    f'{mask_key}: mask {mask!r} holds values {bad[:8]} '
                    f'beyond the classes (0..{largest}, {ignore} = ignore)'
                    '; is it a colour image or of another data set?')
    return len(names), decoded


def check_data_sets(cfg: Any, dataloaders: Sequence[str],
                    logger: Any = None,
                    max_masks_decoded: int = 1000) -> List[str]:
    """Check every COCO-format and mask-folder data set the named data
    loaders read (paths must exist: run
    :func:`bpt_mm.launch.check_data_paths` first).

    Args:
        cfg: The config.
        dataloaders (Sequence[str]): e.g. ``('train_dataloader',
            'val_dataloader')``; ``train_dataloader`` is checked as a
            training set.
        logger: Gets one info line per set (print when None).
        max_masks_decoded (int): Masks per set whose values are checked.

    Returns:
        list[str]: One line per checked set.

    Raises:
        DataSetError: Naming the config key, the file and the problem.
    """
    lines: List[str] = []
    scope = cfg.get('default_scope')
    for name in dataloaders:
        loader = cfg.get(name)
        if not isinstance(loader, dict):
            continue
        training = name == 'train_dataloader'
        for key, dataset in _dataset_entries(loader.get('dataset'),
                                             f'{name}.dataset'):
            ann = dataset.get('ann_file')
            prefix = dataset.get('data_prefix') or {}
            if isinstance(ann, str) and ann.endswith('.json'):
                count = check_coco_set(key, dataset, training, scope)
                lines.append(f'{key}: {count} images match their '
                             'annotations')
            elif str(dataset.get('type', '')).endswith('ADE20KDataset') \
                    and isinstance(prefix, dict) and not ann:
                # Other mask-folder sets have other file-name conventions
                # (class defaults of img_suffix/seg_map_suffix): not read.
                count, decoded = check_segmentation_set(
                    key, dataset, max_masks_decoded, scope)
                lines.append(f'{key}: {count} images and masks match '
                             f'(mask values checked in {decoded})')
    for line in lines:
        if logger is not None:
            logger.info(f'data check: {line}')
    return lines
