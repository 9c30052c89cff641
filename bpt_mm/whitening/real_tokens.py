"""Which patch tokens of a padded batch show the image (torch only).

Detection and segmentation batches are padded at the bottom and right: to
the largest image of the batch and a size divisor (mmdet's and mmseg's data
preprocessors), to a fixed canvas (mmdet's ``BatchFixedSizePad`` after
large-scale jitter), and by the ViT itself to a multiple of the patch size.
A patch that covers only padding is a constant token, and statistics over
tokens (whitening, burstiness, prompt-logit kurtosis) must not count it.

The rule, in one place: patch ``(r, c)`` of an image whose real content is
``h x w`` pixels (its ``img_shape``, as mmdet/mmseg data samples carry it)
is real when it overlaps that content, i.e. ``r * p < h`` and ``c * p < w``
for patch size ``p``; the class token is always real; prompts are never
statistics tokens.

Note: mmcv's pipeline transform ``Pad`` writes the padded size into
``img_shape``; padding done there cannot be told from the image, so a data
set whose pipeline has one is refused by :func:`check_no_pipeline_padding`
wherever token statistics are collected. Padding in the data preprocessor
(``pad_size_divisor``, ``BatchFixedSizePad``) keeps ``img_shape`` the real
size.
"""
import numbers
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ['ImageBatch', 'as_image_batch', 'img_shapes_of',
           'real_patch_mask', 'real_rows', 'pipeline_padding',
           'check_no_pipeline_padding']

#: ``(height, width)`` in pixels of the real content of each image.
ImageShapes = Tuple[Tuple[int, int], ...]


class ImageBatch(NamedTuple):
    """Preprocessed images and, when known, the real size of each.

    Attributes:
        images (Tensor): ``(B, C, H, W)``.
        img_shapes (tuple, optional): ``B`` pairs ``(h, w)`` of pixels that
            are image, not padding (top-left aligned); None when every
            pixel is image.
    """

    images: Tensor
    img_shapes: Optional[ImageShapes] = None

    def first(self, count: int) -> 'ImageBatch':
        """The first ``count`` images (and their shapes)."""
        shapes = None if self.img_shapes is None \
            else self.img_shapes[:count]
        return ImageBatch(self.images[:count], shapes)

    def to(self, device: Any) -> 'ImageBatch':
        """The same batch with its images on ``device``."""
        return ImageBatch(self.images.to(device), self.img_shapes)


def _check_shapes(shapes: Sequence[Any], batch: int) -> ImageShapes:
    if len(shapes) != batch:
        raise ValueError(f'img_shapes has {len(shapes)} entries for a batch '
                         f'of {batch} images')
    out = []
    for shape in shapes:
        # numbers.Integral: a pipeline may compute sizes with numpy.
        if not isinstance(shape, (tuple, list)) or len(shape) < 2 or any(
                isinstance(s, bool) or not isinstance(s, numbers.Integral)
                or s < 1 for s in shape[:2]):
            raise ValueError(f'an img_shape must start with a positive '
                             f'(height, width) pair of ints, got {shape!r}')
        out.append((int(shape[0]), int(shape[1])))
    return tuple(out)


def as_image_batch(batch: Any) -> ImageBatch:
    """A plain ``(B, C, H, W)`` tensor (every pixel real) or an
    :class:`ImageBatch`, validated.

    Raises:
        ValueError: Anything else, or ``img_shapes`` that do not fit.
    """
    if isinstance(batch, ImageBatch):
        images, shapes = batch.images, batch.img_shapes
    else:
        images, shapes = batch, None
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) \
            else type(images).__name__
        raise ValueError('image batches must be (B, C, H, W) tensors or '
                         f'ImageBatch(images, img_shapes), got {shape}')
    if shapes is not None:
        shapes = _check_shapes(shapes, images.shape[0])
    return ImageBatch(images, shapes)


def img_shapes_of(data_samples: Optional[Sequence[Any]]
                  ) -> Optional[ImageShapes]:
    """The ``img_shape`` of every mmdet/mmseg data sample, or None when a
    sample has none (then every pixel counts as image)."""
    if not data_samples:
        return None
    shapes: List[Tuple[int, int]] = []
    for sample in data_samples:
        meta = getattr(sample, 'metainfo', None)
        shape = meta.get('img_shape') if isinstance(meta, dict) else None
        if shape is None:
            return None
        shapes.append(tuple(shape[:2]))
    return _check_shapes(shapes, len(shapes))


def real_patch_mask(img_shapes: Optional[Sequence[Tuple[int, int]]],
                    grid: Tuple[int, int], patch_size: int,
                    batch: int, device: Any = None) -> Tensor:
    """``(B, h * w)`` booleans: which patches of an ``h x w`` patch grid
    overlap each image's real content (row-major, as the ViT's tokens).

    Args:
        img_shapes (Sequence[tuple[int, int]], optional): Real ``(height,
            width)`` per image in pixels; None: all patches are real.
        grid (tuple[int, int]): The patch grid ``(h, w)``.
        patch_size (int): Pixels per patch side.
        batch (int): ``B``.
        device: Device of the mask.

    Returns:
        Tensor: The mask.

    Examples:
        >>> real_patch_mask([(20, 9)], (3, 2), 8, 1).view(3, 2)
        tensor([[True, True],
                [True, True],
                [True, True]])
        >>> real_patch_mask([(8, 8)], (3, 2), 8, 1).view(3, 2)[:, 0]
        tensor([ True, False, False])
    """
    h, w = grid
    if img_shapes is None:
        return torch.ones(batch, h * w, dtype=torch.bool, device=device)
    shapes = torch.tensor(_check_shapes(img_shapes, batch), device=device)
    rows = torch.arange(h, device=device) * patch_size
    cols = torch.arange(w, device=device) * patch_size
    real_rows = rows[None, :] < shapes[:, :1]  # B, h
    real_cols = cols[None, :] < shapes[:, 1:]  # B, w
    return (real_rows[:, :, None] & real_cols[:, None, :]).reshape(batch, -1)


def real_rows(tokens: Tensor, patch_mask: Tensor,
              num_leading: int = 0) -> Tensor:
    """The real tokens of ``(B, n, d)`` ``tokens`` as ``(N, d)`` rows.

    Args:
        tokens (Tensor): ``num_leading`` always-real tokens (class token)
            then the ``h * w`` patch tokens of each image.
        patch_mask (Tensor): ``(B, h * w)`` from :func:`real_patch_mask`.
        num_leading (int): Leading tokens kept in every image.

    Returns:
        Tensor: Rows in image order, each image's leading tokens first.
    """
    if tokens.dim() != 3 or tokens.shape[0] != patch_mask.shape[0] \
            or tokens.shape[1] != num_leading + patch_mask.shape[1]:
        raise ValueError(f'tokens {tuple(tokens.shape)} do not fit a patch '
                         f'mask {tuple(patch_mask.shape)} after '
                         f'{num_leading} leading token(s)')
    lead = torch.ones(patch_mask.shape[0], num_leading, dtype=torch.bool,
                      device=patch_mask.device)
    mask = torch.cat([lead, patch_mask], dim=1).to(tokens.device)
    return tokens[mask]


def pipeline_padding(dataset: Any) -> List[str]:
    """Where the pipelines of ``dataset`` pad images with mmcv's ``Pad``
    (mmdet's ``Pad`` included), which makes ``img_shape`` the padded size.

    Data-set wrappers (``dataset``/``datasets`` attributes: Repeat, Concat,
    ClassBalanced, MultiImageMix) and nested transforms (``transforms``
    attributes: RandomChoice, RandomApply, Compose) are walked.

    Args:
        dataset: A built data set, or None.

    Returns:
        list[str]: One ``'<data set class>.pipeline: Pad(...)'`` per
        padding transform; empty when there is none or mmcv is absent.
    """
    try:
        from mmcv.transforms import Pad
    except ImportError:  # no mmcv: no mmcv pipeline either
        return []
    found: List[str] = []
    seen = set()

    def transforms_of(node: Any, where: str) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, Pad):
            found.append(f'{where}: {node!r}')
            return
        children = getattr(node, 'transforms', None)
        if isinstance(node, (list, tuple)):
            children = node
        if isinstance(children, (list, tuple)):
            for child in children:
                transforms_of(child, where)

    def datasets_of(node: Any) -> None:
        if node is None or id(node) in seen:
            return
        seen.add(id(node))
        pipeline = getattr(node, 'pipeline', None)
        if pipeline is not None:
            transforms_of(pipeline, f'{type(node).__name__}.pipeline')
        datasets_of(getattr(node, 'dataset', None))
        for child in getattr(node, 'datasets', None) or ():
            datasets_of(child)

    datasets_of(dataset)
    return found


def check_no_pipeline_padding(dataset: Any, what: str) -> None:
    """Refuse to collect token statistics from a data set that pads in its
    pipeline: every sample's ``img_shape`` would be the padded size, so the
    padding patches would count as image tokens, unseen.

    Args:
        dataset: A built data set, or None (nothing to check).
        what: What the tokens are collected for, for the message.

    Raises:
        ValueError: The pipeline has a ``Pad``; the message names it and
            says where the padding belongs instead.
    """
    pads = pipeline_padding(dataset)
    if pads:
        raise ValueError(
            f'{what}: the data pipeline pads images ({"; ".join(pads)}), '
            'which writes the padded size into `img_shape`, so padding '
            'patches would be counted as image tokens. Remove `Pad` from '
            'the training pipeline and pad in the data preprocessor '
            'instead (`pad_size_divisor`, or `batch_augments=[dict('
            "type='BatchFixedSizePad', size=...)]`), as mmdet's and "
            "bpt_mm's detector configs do")
