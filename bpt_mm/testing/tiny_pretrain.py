"""A "pretrained" tiny ViT for the demo, made from the generated shapes.

``make demo`` freezes its backbone, as BPT does, which only makes sense
for a backbone that has learned something; no real pretrained weights exist
(or could be downloaded here) for a 4-block, 64-channel ViT. So the demo
makes its own: :func:`ensure_tiny_pretrained` trains the bare ViT (no
prompts) for a short, seeded schedule on a dense proxy task over the
*training* images of the generated COCO set -- per 4x4-pixel cell of every
patch, which class (or background) covers it -- and saves the backbone as a
pretrained checkpoint in timm's key layout. The detector then loads it
frozen through ``init_cfg=dict(type='Pretrained', checkpoint=...)`` and
trains only prompts, neck and heads, as with a real pretrained backbone.

The proxy labels are the class masks the detector also trains on (no
validation image is used); what the backbone learns is that tokens encode
where inside their patch which colour/shape lies, at 4-pixel resolution.

The file is written once, next to the data, with a manifest recording this
module's version and the recipe; an existing file is reused only if that
manifest matches, and a file this module did not make is never replaced.
"""
import hashlib
import json
import os
import os.path as osp
import tempfile
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

__all__ = ['PRETRAIN_VERSION', 'ensure_tiny_pretrained', 'pretrain_tiny_vit']

#: Bump whenever the weights written for the same arguments change.
PRETRAIN_VERSION = 1

# Side (pixels) of the cells whose class each patch token learns to tell:
# the smallest object is 12 px, so a 4-px cell resolves its extent.
_CELL = 4
# Keys of the backbone config that decide the architecture; the rest
# (prompts, freezing, init_cfg, outputs) do not concern pretraining.
_ARCH_KEYS = ('arch', 'img_size', 'patch_size', 'in_channels', 'qkv_bias',
              'patch_bias', 'pre_norm', 'layer_scale_init_value',
              'class_token', 'window_size', 'global_attn_indexes')


def _arch_cfg(backbone_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The architecture keys of a backbone config as plain json values
    (a ConfigDict in the checkpoint would need code to unpickle)."""
    return json.loads(json.dumps(
        {k: backbone_cfg[k] for k in _ARCH_KEYS if k in backbone_cfg}))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _cell_labels(coco: Any, image_id: int, h: int, w: int) -> np.ndarray:
    """(h // _CELL, w // _CELL) class index per cell, 0 = background,
    c = category id c, taken at each cell's centre pixel."""
    full = np.zeros((h, w), dtype=np.int64)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
        full[coco.annToMask(ann).astype(bool)] = ann['category_id']
    centre = _CELL // 2
    return full[centre::_CELL, centre::_CELL][:h // _CELL, :w // _CELL]


def _load_training_set(img_dir: str, ann_file: str, mean: Sequence[float],
                       std: Sequence[float]) -> Tuple[Any, Any, int]:
    """Normalised RGB images (N, 3, H, W), cell labels (N, H/4, W/4) and
    the number of classes plus background."""
    import cv2
    import torch
    from pycocotools.coco import COCO

    coco = COCO(ann_file)
    images, labels = [], []
    for info in coco.loadImgs(sorted(coco.getImgIds())):
        path = osp.join(img_dir, info['file_name'])
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f'tiny pretraining: cannot read image '
                                    f'{path!r} listed in {ann_file!r}')
        rgb = (bgr[..., ::-1].astype(np.float32) - np.float32(mean)) / \
            np.float32(std)
        images.append(torch.from_numpy(rgb.transpose(2, 0, 1).copy()))
        labels.append(torch.from_numpy(
            _cell_labels(coco, info['id'], info['height'], info['width'])))
    num_labels = 1 + max(coco.getCatIds())
    return torch.stack(images), torch.stack(labels), num_labels


def pretrain_tiny_vit(backbone_cfg: Dict[str, Any], img_dir: str,
                      ann_file: str, mean: Sequence[float],
                      std: Sequence[float], iters: int = 100,
                      lr: float = 2e-3, seed: int = 0) -> Dict[str, Any]:
    """Train a bare PromptedViT on the cell-class proxy task.

    Args:
        backbone_cfg: The detector's backbone config; only its
            architecture keys are used (no prompts, not frozen).
        img_dir: Folder of the training images.
        ann_file: Their COCO instances json (masks give the labels).
        mean: Per-channel RGB mean of the detector's data preprocessor.
        std: Per-channel RGB std of the detector's data preprocessor.
        iters: Full-batch AdamW steps (each on all images, half flipped).
        lr: AdamW learning rate (cosine-decayed to 0).
        seed: Seed of the initialisation and the flips.

    Returns:
        dict with ``state_dict`` (the backbone's weights, timm names) and
        ``meta`` (recipe and the final proxy loss/accuracy).
    """
    import torch
    import torch.nn.functional as F

    from bpt_mm.models.frozen_state import EXTRA_STATE_KEY
    from bpt_mm.models.vit import PromptedViT

    images, labels, num_labels = _load_training_set(img_dir, ann_file, mean,
                                                    std)
    arch_cfg = _arch_cfg(backbone_cfg)
    patch = int(arch_cfg.get('patch_size', 16))
    if patch % _CELL:
        raise ValueError(f'tiny pretraining needs `patch_size` divisible by '
                         f'{_CELL}, got {patch}')
    if images.shape[-2] % patch or images.shape[-1] % patch:
        raise ValueError(f'tiny pretraining needs image sides divisible by '
                         f'the patch size {patch}, got '
                         f'{tuple(images.shape[-2:])}')
    cells = patch // _CELL

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # The constructor initialises the weights as timm does.
        vit = PromptedViT(**arch_cfg, frozen=False, prompt=None,
                          out_indices=-1)
        head = torch.nn.Linear(vit.embed_dims, cells * cells * num_labels)
    params = list(vit.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iters)
    vit.train()
    for _ in range(iters):
        flip = torch.rand(len(images), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], images.flip(-1), images)
        y = torch.where(flip[:, None, None], labels.flip(-1), labels)
        logits = _cell_logits(vit, head, x, cells, num_labels)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    vit.eval()
    with torch.no_grad():
        logits = _cell_logits(vit, head, images, cells, num_labels)
        final_loss = float(F.cross_entropy(logits, labels))
        foreground = labels > 0
        accuracy = float((logits.argmax(1) == labels)[foreground].float()
                         .mean())
    state = {k: v.detach().clone() for k, v in vit.state_dict().items()
             if not k.endswith(EXTRA_STATE_KEY)}
    meta = dict(version=PRETRAIN_VERSION, proxy='cell classes', cell=_CELL,
                iters=iters, lr=lr, seed=seed, backbone=arch_cfg,
                final_loss=round(final_loss, 4),
                foreground_cell_accuracy=round(accuracy, 4))
    return dict(state_dict=state, meta=meta)


def _cell_logits(vit: Any, head: Any, x: Any, cells: int,
                 num_labels: int) -> Any:
    """(N, num_labels, H/4, W/4) logits: each token predicts its patch's
    cells x cells grid of cell classes."""
    feats = vit(x)[-1]  # N, C, h, w
    n, _, h, w = feats.shape
    out = head(feats.permute(0, 2, 3, 1))  # N, h, w, cells*cells*labels
    out = out.view(n, h, w, cells, cells, num_labels)
    return out.permute(0, 5, 1, 3, 2, 4).reshape(n, num_labels, h * cells,
                                                 w * cells)


def ensure_tiny_pretrained(path: str, backbone_cfg: Dict[str, Any],
                           img_dir: str, ann_file: str,
                           mean: Sequence[float], std: Sequence[float],
                           data_manifest: Optional[str] = None,
                           iters: int = 100,
                           seed: int = 0) -> Dict[str, Any]:
    """Make the tiny pretrained checkpoint at ``path`` unless it is current.

    A manifest ``path + '.json'`` records the recipe, the data set's own
    manifest digest and the file's SHA-256; the file is reused when all
    match, remade when this module made it with another recipe, and left
    alone (an error) when it is not this module's.

    Args:
        path: Where the checkpoint goes (``.pth``).
        backbone_cfg: The detector's backbone config (architecture keys).
        img_dir: Folder of the generated training images.
        ann_file: Their COCO instances json.
        mean: RGB mean of the detector's data preprocessor.
        std: RGB std of the detector's data preprocessor.
        data_manifest: The data set's manifest file; its digest is part of
            the recipe, so new data gives a new backbone.
        iters: Pretraining steps.
        seed: Pretraining seed.

    Returns:
        dict with ``path``, ``generated`` (bool) and ``meta``.

    Raises:
        ValueError: ``path`` exists but this module did not make it.
    """
    import torch

    arch_cfg = _arch_cfg(backbone_cfg)
    recipe = dict(generator='bpt_mm.tiny_pretrain', version=PRETRAIN_VERSION,
                  backbone=arch_cfg, mean=list(map(float, mean)),
                  std=list(map(float, std)), iters=iters, seed=seed,
                  data=_sha256(data_manifest) if data_manifest else None)
    recipe = json.loads(json.dumps(recipe))  # tuples -> lists, as read back
    manifest_path = path + '.json'
    if osp.lexists(path):
        manifest = None
        if osp.isfile(manifest_path):
            with open(manifest_path, encoding='utf-8') as f:
                manifest = json.load(f)
        if (not isinstance(manifest, dict)
                or manifest.get('recipe', {}).get('generator')
                != recipe['generator']
                or not osp.isfile(path)
                or manifest.get('sha256') != _sha256(path)):
            raise ValueError(
                f'{path!r} exists and was not made by bpt_mm.tiny_pretrain '
                f'(no matching {manifest_path!r}); it is left as it is. Move '
                f'it away or choose another data root')
        if manifest['recipe'] == recipe:
            return dict(path=path, generated=False, meta=manifest['meta'])
    result = pretrain_tiny_vit(backbone_cfg, img_dir, ann_file, mean, std,
                               iters=iters, seed=seed)
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.tmp', dir=osp.dirname(
        osp.abspath(path)))
    os.close(fd)
    try:
        torch.save(dict(state_dict=result['state_dict'],
                        meta=result['meta']), tmp)
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)
    with open(manifest_path, 'w', encoding='utf-8') as f:
        json.dump(dict(recipe=recipe, meta=result['meta'],
                       sha256=_sha256(path)), f, indent=1)
    return dict(path=path, generated=True, meta=result['meta'])
