"""Deterministic tiny data sets for CPU smoke training and tests.

Two generators write small, easy data sets in the layouts mmdetection and
mmsegmentation read natively, so configs can point at them with the stock
``CocoDataset`` and ``ADE20KDataset``:

* :func:`make_coco_instances` -- COCO instances (boxes + polygon masks) of
  solid, class-distinct shapes ('square' red, 'disk' green, 'triangle' blue,
  ...) on a lightly noisy grey background. The shapes are easy on purpose: a
  tiny Mask R-CNN trained for a few iterations on the CPU should reach a
  bbox AP above zero.
* :func:`make_ade20k_semantic` -- ADE20K-style semantic segmentation: JPEG
  images and uint8 PNG label maps with ADE's 150-class convention (0 is
  "other" and is ignored through ``reduce_zero_label=True``).

:func:`ensure_tiny_data` creates both under one root only when missing or
out of date (a manifest records the generator version and parameters) and
publishes each set with a directory rename, so an interrupted generation
never leaves a set that looks complete.

Nothing here imports mmdet, mmseg or torch: the data can be made before the
heavy dependencies exist, and ``make demo`` stays cheap. The data sets are
never committed; they are regenerated on demand (``data/tiny/`` is in
``.gitignore``).

Everything is a pure function of the arguments: every image draws from its
own ``numpy.random.Generator`` seeded by ``(seed, split, index)``, so an image
does not change when the number of images in a split changes, and PNG / JPEG
encoding at fixed settings is byte-stable for a given OpenCV build.
"""
import inspect
import json
import os
import os.path as osp
import shutil
import tempfile
import time
from numbers import Integral
from typing import (Any, Callable, Dict, List, NamedTuple, Optional, Sequence,
                    Tuple)

import cv2
import numpy as np

__all__ = [
    'GENERATOR_VERSION', 'COCO_SHAPES', 'ADE_CLASS_IDS', 'ADE_CLASS_NAMES',
    'MANIFEST_NAME', 'make_coco_instances', 'make_ade20k_semantic',
    'ensure_tiny_data'
]

#: Bump whenever the bytes written for the same arguments change, so that
#: :func:`ensure_tiny_data` regenerates sets made by an older generator.
GENERATOR_VERSION = 1

#: Name of the manifest written last into each finished set.
MANIFEST_NAME = 'MANIFEST.json'


class ShapeSpec(NamedTuple):
    """A COCO class of the tiny detection set: a convex shape and its colour.

    Attributes:
        name: Category name written to the COCO json.
        sides: Number of polygon sides; 0 means a disk, drawn and annotated
            as a fine regular polygon.
        rotation: Base rotation in radians; vertex 0 sits at the top at
            rotation 0 (a 'square' is a 'diamond' turned by 45 degrees).
        rgb: Solid fill colour, RGB.
    """
    name: str
    sides: int
    rotation: float
    rgb: Tuple[int, int, int]


#: Classes of the tiny COCO set in category-id order (id = index + 1). Shape
#: and colour both differ between classes, so either cue alone separates
#: them; the first ``num_classes`` entries are used.
COCO_SHAPES: Tuple[ShapeSpec, ...] = (
    ShapeSpec('square', 4, np.pi / 4, (220, 40, 40)),
    ShapeSpec('disk', 0, 0.0, (40, 200, 60)),
    ShapeSpec('triangle', 3, 0.0, (50, 80, 230)),
    ShapeSpec('diamond', 4, 0.0, (230, 210, 40)),
    ShapeSpec('hexagon', 6, 0.0, (200, 60, 200)),
)

#: ADE20K label ids used by the tiny segmentation set, in the order they are
#: taken: ``num_classes_used=k`` uses the first k. The default 4 are spread
#: over 1..150 (both ends included) so an off-by-one in ``reduce_zero_label``
#: or in a 150-way head shows up; after reduction they are the mmseg class
#: indices 0, 2, 12 and 149.
ADE_CLASS_IDS: Tuple[int, ...] = (1, 3, 13, 150, 5, 21)
#: ADE20K-150 names of :data:`ADE_CLASS_IDS` (for messages and docs only).
ADE_CLASS_NAMES = ('wall', 'sky', 'person', 'flag', 'tree', 'car')
#: Region colours (RGB) per entry of :data:`ADE_CLASS_IDS`; far from the
#: grey background and from each other so a tiny segmentor learns quickly.
_ADE_RGB: Tuple[Tuple[int, int, int], ...] = (
    (220, 40, 40),
    (40, 200, 60),
    (50, 80, 230),
    (230, 210, 40),
    (200, 60, 200),
    (40, 210, 220),
)

# Object size range of the detection set (longest side, pixels).
_MIN_OBJECT = 12
_MAX_OBJECT = 60
# An image side must hold two of the smallest objects side by side.
_MIN_COCO_SIDE = 32
_MIN_ADE_SIDE = 16
_MAX_SIDE = 2048
_MAX_IMAGES = 10000
_MAX_OBJECTS = 8
# Placement attempts per object before giving up on it (the image then has
# fewer objects; the first object always fits because of _MIN_COCO_SIDE).
_PLACEMENT_TRIES = 50
# Boxes of two objects keep this gap, so masks never overlap and the polygon
# of every object equals its visible pixels (no occlusion to annotate).
_GAP = 2
_JPEG_QUALITY = 95
# Full-resolution chroma (4:4:4): the default 4:2:0 halves colour
# resolution, which smears the class colours over the region edges of such
# small images. The flag exists from OpenCV 4.5.5 on; older builds keep
# the default.
_JPEG_PARAMS: List[int] = [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY]
if hasattr(cv2, 'IMWRITE_JPEG_SAMPLING_FACTOR'):
    _JPEG_PARAMS += [
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444
    ]
_SPLITS = {'train': 0, 'val': 1}
# A generator: make(root, **params) -> summary dict.
_Maker = Callable[..., Dict[str, Any]]
# Temporary folders of interrupted generations older than this are pruned.
_STALE_TMP_S = 3600.0


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------
def _check_int(name: str, value: Any, low: int, high: int) -> int:
    """Return ``value`` as an int, or raise ValueError naming ``name``.

    ValueError (not TypeError) is raised for a wrong type too, so a caller
    (e.g. the CLI) handles every bad argument the same way.
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f'{name} must be an integer in [{low}, {high}], '
                         f'got {value!r}')
    if not low <= value <= high:
        raise ValueError(f'{name} must be in [{low}, {high}], got {value}')
    return int(value)


def _check_size(name: str, value: Any, low: int) -> Tuple[int, int]:
    """Return ``value`` as ``(width, height)`` with both sides checked."""
    if isinstance(value, (str, bytes)) or not isinstance(
            value, (Sequence, np.ndarray)) or len(value) != 2:
        raise ValueError(f'{name} must be (width, height) with each side in '
                         f'[{low}, {_MAX_SIDE}], got {value!r}')
    w = _check_int(f'{name}[0] (width)', value[0], low, _MAX_SIDE)
    h = _check_int(f'{name}[1] (height)', value[1], low, _MAX_SIDE)
    return w, h


def _check_seed(seed: Any) -> int:
    return _check_int('seed', seed, 0, 2**32 - 1)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Per-image generator: images are independent of the split sizes."""
    return np.random.default_rng([seed, _SPLITS[split], index])


# --------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------
def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A mid-grey RGB background with light noise.

    The noise stops a model from keying on "any non-constant pixel"; it is
    small (std 4) and grey, so the saturated class colours stay obvious.
    """
    level = rng.integers(70, 130)
    noise = rng.normal(0.0, 4.0, size=(h, w, 1))
    img = np.clip(level + noise, 0, 255).astype(np.uint8)
    return np.repeat(img, 3, axis=2)


def _rasterize_polygon(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    """Boolean mask of a polygon, pixel for pixel as COCO tools decode it.

    Painting the image with the mask pycocotools makes from the annotation's
    polygon (rather than cv2.fillPoly, which draws boundary pixels
    inclusively and differs by ~10% of a small object's pixels) keeps the
    pixels and the annotation in exact agreement.

    Args:
        poly: (N, 2) float vertices, x then y (as in ``segmentation``).
        h: Image height.
        w: Image width.

    Returns:
        (h, w) bool mask.
    """
    from pycocotools import mask as mask_utils
    rle = mask_utils.frPyObjects([poly.reshape(-1).tolist()], h, w)
    return mask_utils.decode(mask_utils.merge(rle)).astype(bool)


def _shape_polygon(spec: ShapeSpec, cx: float, cy: float, size: float,
                   angle: float) -> np.ndarray:
    """Vertices of a class shape whose longest box side is ``size``.

    Coordinates are rounded to 2 decimals here, once, and both the drawing
    and the annotation use the rounded values, so the json is short and
    describes exactly the polygon that was drawn.
    """
    if spec.sides == 0:
        # Enough vertices that the polygon is within ~0.1 px of the circle
        # (sagitta r * (1 - cos(pi / n)) ~ r * pi^2 / (2 n^2)).
        n = max(24, int(np.ceil(np.pi * np.sqrt(size / 2 / 0.2))))
    else:
        n = spec.sides
    # Vertex 0 at the top (a triangle points up before the small jitter).
    t = angle + spec.rotation - np.pi / 2 + 2 * np.pi * np.arange(n) / n
    unit = np.stack([np.cos(t), np.sin(t)], 1)
    # Scale so the box, not the circumscribed circle, is `size` across:
    # a 12 px square is 12 px wide, not 12 / sqrt(2).
    unit *= size / float(np.max(unit.max(0) - unit.min(0)))
    # Centre the box (not the circle) on (cx, cy), so the box stays inside
    # the image for any shape.
    unit -= (unit.max(0) + unit.min(0)) / 2
    return np.round(unit + np.array([cx, cy]), 2)


def _boxes_clash(a: Sequence[float], b: Sequence[float], gap: float) -> bool:
    """Whether two xyxy boxes come closer than ``gap`` pixels."""
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1]
                or b[3] + gap <= a[1])


def _draw_coco_image(
        rng: np.random.Generator, index: int, w: int, h: int, num_classes: int,
        max_objects: int) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """One detection image and its objects (category index + polygon)."""
    img = _background(rng, h, w)
    max_size = min(_MAX_OBJECT, min(w, h) // 2)
    num = int(rng.integers(1, max_objects + 1))
    objects: List[Dict[str, Any]] = []
    boxes: List[Tuple[float, float, float, float]] = []
    for k in range(num):
        # The first object cycles through the classes, so every class is in
        # any split with at least num_classes images (COCOeval then has
        # ground truth for each); the others are random.
        cls = index % num_classes if k == 0 else int(rng.integers(num_classes))
        spec = COCO_SHAPES[cls]
        for _try in range(_PLACEMENT_TRIES):
            # `size` is the longest side of the object's box.
            size = float(rng.uniform(_MIN_OBJECT, max_size))
            half = size / 2.0
            cx = float(rng.uniform(half + 1, w - half - 1))
            cy = float(rng.uniform(half + 1, h - half - 1))
            angle = float(rng.uniform(-np.pi / 12, np.pi / 12))
            poly = _shape_polygon(spec, cx, cy, size, angle)
            box = (float(poly[:, 0].min()), float(poly[:, 1].min()),
                   float(poly[:, 0].max()), float(poly[:, 1].max()))
            if any(_boxes_clash(box, b, _GAP) for b in boxes):
                continue
            mask = _rasterize_polygon(poly, h, w)
            if not mask.any():
                continue
            img[mask] = spec.rgb
            boxes.append(box)
            objects.append(
                dict(cls=cls, poly=poly, box=box, area=int(mask.sum())))
            break
    return img, objects


def _write_json(path: str, obj: Any) -> None:
    """Write json with a fixed layout, so equal data gives equal bytes."""
    with open(path, 'w', encoding='utf-8', newline='\n') as f:
        json.dump(obj, f, indent=None, separators=(',', ':'), sort_keys=False)
        f.write('\n')


def _imwrite(path: str, rgb: np.ndarray, params: Sequence[int] = ()) -> None:
    """Write an RGB (or single channel) image, raising if OpenCV fails.

    cv2.imwrite only returns False on failure; a silent failure would leave
    a set that looks complete but is not.
    """
    arr = rgb[..., ::-1] if rgb.ndim == 3 else rgb
    if not cv2.imwrite(path, np.ascontiguousarray(arr), list(params)):
        raise OSError(f'cv2.imwrite failed for {path}')


# --------------------------------------------------------------------------
# COCO instances
# --------------------------------------------------------------------------
def _coco_layout(root: str) -> Dict[str, str]:
    return dict(root=root,
                train_img_dir=osp.join(root, 'train2017'),
                val_img_dir=osp.join(root, 'val2017'),
                train_ann_file=osp.join(root, 'annotations',
                                        'instances_train2017.json'),
                val_ann_file=osp.join(root, 'annotations',
                                      'instances_val2017.json'))


def make_coco_instances(root: str,
                        num_train: int = 16,
                        num_val: int = 8,
                        image_size: Sequence[int] = (160, 128),
                        num_classes: int = 3,
                        max_objects: int = 3,
                        seed: int = 0) -> Dict[str, Any]:
    """Write a tiny COCO instance segmentation set of solid shapes.

    Layout (file names are the zero-padded image id, COCO style)::

        root/train2017/000000000001.png ...
        root/val2017/000000000001.png ...
        root/annotations/instances_train2017.json
        root/annotations/instances_val2017.json

    Each image has 1..``max_objects`` non-overlapping objects (boxes keep a
    2 px gap, so no object is occluded), 12-60 px across (at most half the
    shorter image side), filled with the exact class colour on a grey,
    lightly noisy background. Annotations carry ``bbox`` [x, y, w, h] of the
    polygon, ``area`` (pixels of the mask, as in COCO), ``iscrowd`` 0 and
    ``segmentation`` as one polygon ``[[x1, y1, x2, y2, ...]]``. The painted
    pixels are exactly the mask pycocotools makes from the polygon
    (``COCO.annToMask``). Disks are polygons with >= 24 vertices.
    Category ids start at 1 in :data:`COCO_SHAPES` order. Images are PNG so
    pixels are exact. Existing files of the same names are overwritten;
    other files in ``root`` are left alone.

    Args:
        root: Output folder (created if missing).
        num_train: Images in train2017, in [1, 10000].
        num_val: Images in val2017, in [1, 10000].
        image_size: (width, height), each side in [32, 2048].
        num_classes: Number of categories, in [1, len(COCO_SHAPES)] (5).
        max_objects: Most objects per image, in [1, 8]; an image can end up
            with fewer when no free spot is found.
        seed: Non-negative seed; the output is a function of the arguments.

    Returns:
        dict with ``root``, ``train_img_dir``, ``val_img_dir``,
        ``train_ann_file``, ``val_ann_file`` (paths), ``classes`` (tuple of
        names), ``palette`` (list of RGB lists), ``num_images`` and
        ``num_annotations`` (dicts keyed by 'train' / 'val').

    Raises:
        ValueError: An argument is out of range; the message names it.

    Examples:
        >>> import tempfile
        >>> info = make_coco_instances(tempfile.mkdtemp(), num_train=2,
        ...                            num_val=1)
        >>> info['classes']
        ('square', 'disk', 'triangle')
        >>> info['num_images']
        {'train': 2, 'val': 1}
    """
    num_train = _check_int('num_train', num_train, 1, _MAX_IMAGES)
    num_val = _check_int('num_val', num_val, 1, _MAX_IMAGES)
    w, h = _check_size('image_size', image_size, _MIN_COCO_SIDE)
    num_classes = _check_int('num_classes', num_classes, 1, len(COCO_SHAPES))
    max_objects = _check_int('max_objects', max_objects, 1, _MAX_OBJECTS)
    seed = _check_seed(seed)

    info: Dict[str, Any] = _coco_layout(root)
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    categories = [
        dict(id=i + 1, name=s.name, supercategory='shape')
        for i, s in enumerate(COCO_SHAPES[:num_classes])
    ]
    num_images: Dict[str, int] = {}
    num_annotations: Dict[str, int] = {}
    for split, count in (('train', num_train), ('val', num_val)):
        img_dir = info[f'{split}_img_dir']
        os.makedirs(img_dir, exist_ok=True)
        images: List[Dict[str, Any]] = []
        annotations: List[Dict[str, Any]] = []
        for index in range(count):
            image_id = index + 1
            img, objects = _draw_coco_image(_rng(seed, split, index), index, w,
                                            h, num_classes, max_objects)
            file_name = f'{image_id:012d}.png'
            _imwrite(osp.join(img_dir, file_name), img)
            images.append(
                dict(id=image_id, file_name=file_name, width=w, height=h))
            for obj in objects:
                x0, y0, x1, y1 = obj['box']
                annotations.append(
                    dict(id=len(annotations) + 1,
                         image_id=image_id,
                         category_id=obj['cls'] + 1,
                         bbox=[
                             round(x0, 2),
                             round(y0, 2),
                             round(x1 - x0, 2),
                             round(y1 - y0, 2)
                         ],
                         area=obj['area'],
                         iscrowd=0,
                         segmentation=[[
                             float(v) for v in obj['poly'].reshape(-1)
                         ]]))
        dataset = dict(info=dict(description='bpt_mm tiny shapes (synthetic)',
                                 version=str(GENERATOR_VERSION)),
                       licenses=[],
                       images=images,
                       annotations=annotations,
                       categories=categories)
        _write_json(info[f'{split}_ann_file'], dataset)
        num_images[split] = len(images)
        num_annotations[split] = len(annotations)
    info.update(classes=tuple(s.name for s in COCO_SHAPES[:num_classes]),
                palette=[list(s.rgb) for s in COCO_SHAPES[:num_classes]],
                num_images=num_images,
                num_annotations=num_annotations)
    return info


# --------------------------------------------------------------------------
# ADE20K semantic segmentation
# --------------------------------------------------------------------------
def _ade_layout(root: str) -> Dict[str, str]:
    return dict(root=root,
                train_img_dir=osp.join(root, 'images', 'training'),
                val_img_dir=osp.join(root, 'images', 'validation'),
                train_ann_dir=osp.join(root, 'annotations', 'training'),
                val_ann_dir=osp.join(root, 'annotations', 'validation'))


def _draw_ade_image(rng: np.random.Generator, index: int, w: int, h: int,
                    num_classes_used: int) -> Tuple[np.ndarray, np.ndarray]:
    """One segmentation image (RGB) and its ADE label map (uint8)."""
    img = _background(rng, h, w)
    label = np.zeros((h, w), dtype=np.uint8)
    num = int(rng.integers(1, 4))
    for k in range(num):
        # The first region cycles through the classes so every used class
        # appears in any split with at least num_classes_used images.
        j = (index % num_classes_used if k == 0 else int(
            rng.integers(num_classes_used)))
        # Each region spans at most half of each side, so three regions
        # cover at most 3/4 of the image: label 0 is always present.
        rw = int(rng.integers(max(2, w // 4), w // 2 + 1))
        rh = int(rng.integers(max(2, h // 4), h // 2 + 1))
        x0 = int(rng.integers(0, w - rw + 1))
        y0 = int(rng.integers(0, h - rh + 1))
        if rng.random() < 0.5:
            region = np.zeros((h, w), dtype=bool)
            region[y0:y0 + rh, x0:x0 + rw] = True
        else:
            # Ellipse inscribed in the box, by pixel centres (no cv2 edge
            # rules involved, so label and image agree exactly).
            ys = np.arange(h)[:, None] + 0.5
            xs = np.arange(w)[None, :] + 0.5
            region = (((xs - x0 - rw / 2) / (rw / 2))**2 +
                      ((ys - y0 - rh / 2) / (rh / 2))**2) <= 1.0
        img[region] = _ADE_RGB[j]
        label[region] = ADE_CLASS_IDS[j]
    return img, label


def make_ade20k_semantic(root: str,
                         num_train: int = 8,
                         num_val: int = 4,
                         image_size: Sequence[int] = (64, 64),
                         num_classes_used: int = 4,
                         seed: int = 0) -> Dict[str, Any]:
    """Write a tiny ADE20K-layout semantic segmentation set.

    Layout (as mmseg's ``ADE20KDataset`` reads it: ``img_suffix='.jpg'``,
    ``seg_map_suffix='.png'``, same stem)::

        root/images/training/ADE_train_00000001.jpg ...
        root/images/validation/ADE_val_00000001.jpg ...
        root/annotations/training/ADE_train_00000001.png ...
        root/annotations/validation/ADE_val_00000001.png ...

    Label maps are single-channel uint8 PNGs in ADE's convention: 0 is
    "other" (becomes 255, ignored, under ``reduce_zero_label=True``) and
    1..150 are the classes (k becomes k - 1). Each image has 1-3 rectangles
    or ellipses, each at most half of each side, of the first
    ``num_classes_used`` ids of :data:`ADE_CLASS_IDS` (1, 3, 13, 150, 5, 21
    = wall, sky, person, flag, tree, car), each id with its own solid
    colour; the rest is label 0 on a grey noisy background, so every label
    map has 0 pixels. Images are JPEG at quality 95 with 4:4:4 chroma
    (byte-stable for a given OpenCV build); JPEG rings a little at region
    edges, labels are exact.

    Args:
        root: Output folder (created if missing).
        num_train: Training images, in [1, 10000].
        num_val: Validation images, in [1, 10000].
        image_size: (width, height), each side in [16, 2048].
        num_classes_used: How many ids of :data:`ADE_CLASS_IDS` to use, in
            [1, 6].
        seed: Non-negative seed; the output is a function of the arguments.

    Returns:
        dict with ``root``, ``train_img_dir``, ``val_img_dir``,
        ``train_ann_dir``, ``val_ann_dir`` (paths), ``class_ids`` (tuple of
        ADE ids used), ``class_names``, ``num_images`` (dict keyed by
        'train' / 'val').

    Raises:
        ValueError: An argument is out of range; the message names it.

    Examples:
        >>> import tempfile
        >>> info = make_ade20k_semantic(tempfile.mkdtemp(), num_train=2,
        ...                             num_val=1)
        >>> info['class_ids']
        (1, 3, 13, 150)
    """
    num_train = _check_int('num_train', num_train, 1, _MAX_IMAGES)
    num_val = _check_int('num_val', num_val, 1, _MAX_IMAGES)
    w, h = _check_size('image_size', image_size, _MIN_ADE_SIDE)
    num_classes_used = _check_int('num_classes_used', num_classes_used, 1,
                                  len(ADE_CLASS_IDS))
    seed = _check_seed(seed)

    info: Dict[str, Any] = _ade_layout(root)
    num_images: Dict[str, int] = {}
    for split, count, prefix in (('train', num_train, 'ADE_train_'),
                                 ('val', num_val, 'ADE_val_')):
        img_dir, ann_dir = info[f'{split}_img_dir'], info[f'{split}_ann_dir']
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for index in range(count):
            img, label = _draw_ade_image(_rng(seed, split, index), index, w, h,
                                         num_classes_used)
            stem = f'{prefix}{index + 1:08d}'
            _imwrite(osp.join(img_dir, stem + '.jpg'), img, _JPEG_PARAMS)
            _imwrite(osp.join(ann_dir, stem + '.png'), label)
        num_images[split] = count
    info.update(class_ids=ADE_CLASS_IDS[:num_classes_used],
                class_names=ADE_CLASS_NAMES[:num_classes_used],
                num_images=num_images)
    return info


# --------------------------------------------------------------------------
# Cached, atomic creation
# --------------------------------------------------------------------------
def _json_default(obj: Any) -> Any:
    """numpy scalars and arrays (e.g. a seed or image_size) as json."""
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    raise TypeError(f'{type(obj).__name__} is not JSON serializable')


def _list_files(root: str) -> Dict[str, int]:
    """Relative path -> size of every file under ``root`` (sorted)."""
    files: Dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = osp.join(dirpath, name)
            rel = osp.relpath(path, root).replace(os.sep, '/')
            if rel != MANIFEST_NAME:
                files[rel] = osp.getsize(path)
    return files


def _read_manifest(set_root: str) -> Optional[Dict[str, Any]]:
    try:
        with open(osp.join(set_root, MANIFEST_NAME), encoding='utf-8') as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _is_current(set_root: str, header: Dict[str, Any]) -> bool:
    """Whether ``set_root`` holds a finished set made with ``header``.

    Besides the version and parameters, every listed file must still exist
    with its size, so a set someone partly deleted is regenerated.
    """
    manifest = _read_manifest(set_root)
    if manifest is None or any(
            manifest.get(k) != v for k, v in header.items()):
        return False
    files = manifest.get('files')
    if not isinstance(files, dict):
        return False
    for rel, size in files.items():
        path = osp.join(set_root, rel)
        if not osp.isfile(path) or osp.getsize(path) != size:
            return False
    return True


def check_replaceable(target: str) -> None:
    """Refuse to replace ``target`` unless this generator made it.

    Only a folder holding a manifest written by this module may be moved
    aside and removed: without one, ``target`` may be a user's real data set
    (``--out data`` would otherwise replace ``data/coco``).

    Args:
        target: A set folder (``OUT/coco`` or ``OUT/ade20k``).

    Raises:
        ValueError: ``target`` exists and is a file, a link, or a folder
            without this generator's manifest; the message names it.
    """
    if not osp.lexists(target):
        return
    if osp.islink(target) or not osp.isdir(target):
        raise ValueError(
            f'{target!r} exists and is not a folder made by this generator '
            f'(it is a file or a link); it is left as it is. Choose another '
            f'output folder (--out)')
    manifest = _read_manifest(target)
    if manifest is None or manifest.get('generator') != 'bpt_mm.tiny_data':
        raise ValueError(
            f'{target!r} exists and has no {MANIFEST_NAME} of this '
            f'generator, so it may be real data; it is left as it is. '
            f'Choose another output folder (--out); --force only replaces '
            f'a folder the generator made itself')
    # The manifest says the generator made the folder, not that it made
    # everything in it: files added since (a user's annotations, results
    # written beside the images) would go with the folder.
    listed = manifest.get('files')
    listed = listed if isinstance(listed, dict) else {}
    added = sorted(set(_list_files(target)) - set(listed))
    if added:
        shown = ', '.join(added[:5]) + (
            f' and {len(added) - 5} more' if len(added) > 5 else '')
        raise ValueError(
            f'{target!r} was made by this generator but now also holds '
            f'{len(added)} file(s) it did not make ({shown}); it is left as '
            f'it is. Move them out of the folder, or choose another output '
            f'folder (--out)')


def _check_out_root(root: str) -> None:
    """Refuse an output parent folder that is an existing file."""
    if osp.lexists(root) and not osp.isdir(root):
        raise ValueError(f'output folder (--out) {root!r} is an existing '
                         f'file; choose a folder for the tiny data sets')


def _prune_stale_tmp(root: str, name: str) -> None:
    """Remove temporary folders left by generations that were killed."""
    now = time.time()
    for entry in os.listdir(root):
        if entry.startswith(f'.{name}.tmp-') or entry.startswith(
                f'.{name}.old-'):
            path = osp.join(root, entry)
            try:
                if now - os.stat(path).st_mtime > _STALE_TMP_S:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def _ensure_set(root: str, name: str, make: _Maker, params: Dict[str, Any],
                force: bool) -> Tuple[Dict[str, Any], bool]:
    """Create ``root/name`` with ``make(**params)`` unless it is current.

    The set is written to a hidden temporary folder next to the target, the
    manifest goes in last, then the folder is renamed into place (moving an
    old set aside first, as rename cannot replace a non-empty folder). A
    reader therefore sees either the old set, no set, or the complete new
    one, never a partial set with a manifest.

    Returns:
        (manifest, generated) where ``generated`` says whether it was made.
    """
    target = osp.join(root, name)
    header = dict(generator='bpt_mm.tiny_data',
                  version=GENERATOR_VERSION,
                  kind=name,
                  params=params)
    if not force and _is_current(target, header):
        manifest = _read_manifest(target)
        assert manifest is not None
        return manifest, False
    check_replaceable(target)

    os.makedirs(root, exist_ok=True)
    _prune_stale_tmp(root, name)
    tmp = tempfile.mkdtemp(prefix=f'.{name}.tmp-', dir=root)
    try:
        # mkdtemp makes the folder private (0700); the published set should
        # have ordinary permissions.
        os.chmod(tmp, 0o755)
        summary = make(tmp, **params)
        # Paths inside the summary point at tmp; keep the rest.
        summary = {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in summary.items() if not isinstance(v, str)
        }
        manifest = dict(header, summary=summary, files=_list_files(tmp))
        _write_json(osp.join(tmp, MANIFEST_NAME), manifest)
        old = None
        if osp.lexists(target):
            old = tempfile.mkdtemp(prefix=f'.{name}.old-', dir=root)
            os.rename(target, osp.join(old, name))
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process published a set in between; keep it if it is
            # the one we wanted, otherwise put the old set back and fail.
            if not _is_current(target, header):
                if old is not None and not osp.lexists(target):
                    os.rename(osp.join(old, name), target)
                    shutil.rmtree(old, ignore_errors=True)
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if osp.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest, True


def ensure_tiny_data(
        root: str = 'data/tiny',
        seed: int = 0,
        num_train: Optional[int] = None,
        num_val: Optional[int] = None,
        force: bool = False,
        coco: Optional[Dict[str, Any]] = None,
        ade20k: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Create the tiny COCO and ADE20K sets under ``root`` if needed.

    ``root/coco`` is made by :func:`make_coco_instances` and ``root/ade20k``
    by :func:`make_ade20k_semantic`. Each set holds a ``MANIFEST.json``
    (written last) with the generator version, the parameters and the list
    of files with their sizes; a set is regenerated only when its manifest
    differs, or a listed file is missing or has changed size. A folder
    without this generator's manifest (a user's data) is never replaced:
    it is refused (:func:`check_replaceable`), ``force`` included.
    Generation goes to a hidden temporary folder that is renamed into place,
    so an interrupted run never leaves a set that looks complete. A second
    call with the same arguments writes nothing.

    Args:
        root: Parent folder of both sets; a relative path is relative to
            the working directory (the repo root under ``make demo``).
        seed: Seed of both sets.
        num_train: Training images of both sets; None keeps each
            generator's default (16 for COCO, 8 for ADE20K).
        num_val: Validation images of both sets; None keeps the defaults
            (8 and 4).
        force: Regenerate even when the sets are current.
        coco: Extra keyword arguments of :func:`make_coco_instances`
            (e.g. ``image_size``, ``num_classes``); they win over the
            arguments above.
        ade20k: Extra keyword arguments of :func:`make_ade20k_semantic`.

    Returns:
        dict with ``root`` and, for 'coco' and 'ade20k', a dict of the set's
        paths (as returned by the generator, under ``root``), its summary
        (classes, counts), ``params`` and ``generated`` (whether this call
        wrote it).

    Raises:
        ValueError: An argument is out of range, ``root`` is a file, or a
            set folder exists that this generator did not make; the message
            names it.

    Examples:
        >>> import tempfile
        >>> out = ensure_tiny_data(tempfile.mkdtemp(), num_train=2, num_val=1)
        >>> out['coco']['generated'], out['ade20k']['num_images']
        (True, {'train': 2, 'val': 1})
    """
    seed = _check_seed(seed)
    _check_out_root(root)
    common: Dict[str, Any] = dict(seed=seed)
    if num_train is not None:
        common['num_train'] = _check_int('num_train', num_train, 1,
                                         _MAX_IMAGES)
    if num_val is not None:
        common['num_val'] = _check_int('num_val', num_val, 1, _MAX_IMAGES)
    result: Dict[str, Any] = dict(root=root)
    sets = [('coco', make_coco_instances, _coco_layout, coco),
            ('ade20k', make_ade20k_semantic, _ade_layout, ade20k)]
    for name, make, layout, extra in sets:
        params = dict(common, **(extra or {}))
        # Record every parameter, defaults included, so a manifest shows
        # exactly what made the set and a changed default regenerates it.
        sig = inspect.signature(make)
        unknown = set(params) - set(sig.parameters) | ({'root'} & set(params))
        if unknown:
            raise ValueError(f'{name} got unknown arguments {sorted(unknown)}'
                             f'; allowed: {list(sig.parameters)[1:]}')
        params = {
            k: params.get(k, p.default)
            for k, p in sig.parameters.items() if k != 'root'
        }
        # Normalise through json so (160, 128) and [160, 128] compare equal
        # with what a manifest read back holds.
        params = json.loads(json.dumps(params, default=_json_default))
        manifest, generated = _ensure_set(root, name, make, params, force)
        entry: Dict[str, Any] = dict(layout(osp.join(root, name)))
        entry.update({
            k: tuple(v) if k.startswith('class') else v
            for k, v in manifest['summary'].items()
        })
        entry.update(params=params, generated=generated)
        result[name] = entry
    return result
