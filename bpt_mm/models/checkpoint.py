"""Load foreign ViT checkpoints into bpt_mm's timm-named layout.

:class:`~bpt_mm.models.vit.PromptedViT` keeps timm's parameter names
(``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.{i}.norm1.*``,
``blocks.{i}.attn.qkv.*``, ``blocks.{i}.attn.proj.*``, ``blocks.{i}.norm2.*``,
``blocks.{i}.mlp.fc1.*``, ``blocks.{i}.mlp.fc2.*``, optional
``blocks.{i}.ls1.gamma`` / ``ls2.gamma`` and ``norm.*``) plus ``prompts.*``,
which no pretrained file has. Pretrained ViTs come in several other layouts;
this module recognises them and renames their keys, as pure functions on
state dicts, so that one loader serves every source:

========== ==================================================================
layout     what the file looks like
========== ==================================================================
timm       timm / DeiT / DeiT-3 / MAE-finetuned: timm names, maybe with
           ``head.*``, ``fc_norm.*``, ``head_dist.*``, ``dist_token``, and
           DeiT-3's original ``blocks.{i}.gamma_1`` / ``gamma_2``.
mae        MAE pre-training (``models_mae.py``): the timm encoder plus
           ``mask_token``, ``decoder_embed.*``, ``decoder_pos_embed``,
           ``decoder_blocks.*``, ``decoder_norm.*``, ``decoder_pred.*``.
mocov3     MoCo v3 (``moco/builder.py``): ``module.base_encoder.*`` (timm
           names, ``head.*`` is the projection MLP),
           ``module.momentum_encoder.*``, ``module.predictor.*``.
mmpretrain mmpretrain ``VisionTransformer``: ``backbone.`` prefix,
           ``patch_embed.projection.*``, ``layers.{i}.ln1/ln2.*``,
           ``layers.{i}.attn.qkv/proj.*``, ``layers.{i}.ffn.layers.0.0.*``
           (fc1), ``layers.{i}.ffn.layers.1.*`` (fc2), layer scale
           ``layers.{i}.attn.gamma1.weight`` / ``ffn.gamma2.weight``, final
           ``ln1.*``, CLIP-style ``pre_norm.*``, ``head.*``.
mmseg      mmseg ``VisionTransformer``: like mmpretrain but the attention is
           ``torch.nn.MultiheadAttention``: ``layers.{i}.attn.attn.
           in_proj_weight/in_proj_bias`` (the fused qkv) and
           ``layers.{i}.attn.attn.out_proj.*``; CLIP-style ``ln_pre.*``.
bpt_mm     already timm names, maybe under ``backbone.`` and with
           ``prompts.*`` (a checkpoint written by this package).
========== ==================================================================

A converted file either fits the model exactly or is refused: parts one
side has and the other lacks (patch bias, pre-norm, layer scale, qkv bias;
:data:`ARCHITECTURE_OPTIONS`) are an error naming the PromptedViT option
that fits, and so is any other weight the model has no place for. Only
parts known to be irrelevant to the backbone (heads, MAE decoder and mask
token, MoCo v3's momentum encoder and predictor, ...) are dropped, by name.

The usual entry point is :func:`load_pretrained`; the steps it chains
(:func:`load_checkpoint_file`, :func:`unwrap_state_dict`,
:func:`detect_layout`, :func:`convert_to_timm_layout`,
:func:`resample_pos_embed`) are public for tools and tests.

Files are always read with ``torch.load(..., weights_only=True)``: a
checkpoint is data, and a file whose pickle needs anything beyond tensors and
plain containers is refused rather than executed.
"""
import argparse
import math
import os
import re
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from timm.layers import resample_abs_pos_embed

from ..finite import non_finite_tensors
from ..safe_load import CheckpointError, load_weights_only

__all__ = [
    'CheckpointError', 'KNOWN_LAYOUTS', 'ARCHITECTURE_OPTIONS',
    'load_checkpoint_file', 'unwrap_state_dict', 'detect_layout',
    'convert_to_timm_layout', 'architecture_mismatch', 'resample_pos_embed',
    'load_pretrained', 'check_tensor_limits', 'MAX_TENSOR_FACTOR'
]

#: Layouts :func:`detect_layout` can return, in the order it tries them.
KNOWN_LAYOUTS: Tuple[str, ...] = ('bpt_mm', 'mocov3', 'mmseg', 'mmpretrain',
                                  'mae', 'timm')

# Containers a training script may wrap the weights in, most specific first:
# mmengine/MoCo/timm-train write 'state_dict', DeiT/MAE write 'model', some
# DataParallel dumps write 'module'. 'model_ema' is deliberately not searched:
# when present it sits next to 'model', which holds the weights people cite.
_CONTAINER_KEYS: Tuple[str, ...] = ('state_dict', 'model', 'module')

# Classes allowed on top of torch's weights-only set. MAE's and DeiT's
# training scripts store their argparse ``args`` next to the weights;
# a Namespace only receives attributes, so accepting it runs no code (in
# the zip format: the legacy format, whose loader hands such objects to
# code that writes files, is refused before torch reads it).
_EXTRA_SAFE_GLOBALS: List[type] = [argparse.Namespace]

_PROMPT_PREFIX = 'prompts.'


# --------------------------------------------------------------------- file
def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Read a checkpoint written by ``torch.save``, never executing code.

    The file goes through :func:`bpt_mm.safe_load.load_weights_only`
    (torch's weights-only unpickler, after limits on the file's declared
    sizes), with ``argparse.Namespace`` allowed on top.

    Args:
        path (str): Path of the file.

    Returns:
        dict: What the file holds (a state dict or a container of one).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: The file is empty, truncated, corrupt, not a torch
            checkpoint, in torch's legacy format, declares absurd sizes, or
            its pickle needs objects other than tensors and containers,
            which would mean running code from the file: that is refused,
            never retried with ``weights_only=False``.

    Examples:
        >>> import os.path as osp, tempfile
        >>> path = osp.join(tempfile.mkdtemp(), 'vit.pth')
        >>> torch.save({'model': {'pos_embed': torch.zeros(1, 5, 8)}}, path)
        >>> sorted(load_checkpoint_file(path))
        ['model']
    """
    path = os.fspath(path)
    ckpt = load_weights_only(path, what='checkpoint',
                             extra_globals=_EXTRA_SAFE_GLOBALS)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'checkpoint {path!r} holds a '
                              f'{type(ckpt).__name__}, expected a dict of '
                              f'tensors or a dict containing one')
    return ckpt


#: Last name parts that only weights have (timm/MAE/mmpretrain layouts):
#: such an entry that is not a tensor is refused, not skipped.
_WEIGHT_NAMES = frozenset((
    'weight', 'bias', 'pos_embed', 'cls_token', 'dist_token', 'reg_token',
    'mask_token', 'gamma', 'gamma_1', 'gamma_2', 'running_mean',
    'running_var', 'relative_position_bias_table'))


def _tensor_items(obj: Any) -> Dict[str, Tensor]:
    """The tensor-valued entries of ``obj`` if it is a dict, else ``{}``."""
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items()
            if isinstance(k, str) and isinstance(v, Tensor)}


def unwrap_state_dict(ckpt: Dict[str, Any]) -> Tuple[Dict[str, Tensor], str]:
    """Find the tensor dict inside a checkpoint's container.

    Looks for ``'state_dict'``, ``'model'`` and ``'module'`` (in that order,
    descending through nested containers such as ``{'model': {'module':
    ...}}``), else takes the dict itself when it holds tensors.

    Args:
        ckpt (dict): What :func:`load_checkpoint_file` returned.

    Returns:
        tuple[dict, str]: The state dict (tensor entries only; scalars such
        as a stored ``epoch`` are not weights) and the container path used,
        e.g. ``'model'`` or ``'model/module'``, or ``''`` for a bare dict.

    Raises:
        CheckpointError: No dict of tensors was found.

    Examples:
        >>> t = torch.zeros(1, 5, 8)
        >>> sd, where = unwrap_state_dict({'model': {'pos_embed': t}})
        >>> where
        'model'
    """
    current: Any = ckpt
    path: List[str] = []
    # Bounded descent: real files nest at most two levels deep.
    for _ in range(4):
        if not isinstance(current, dict):
            break
        for key in _CONTAINER_KEYS:
            if isinstance(current.get(key), dict) and (
                    _tensor_items(current[key])
                    or any(isinstance(current[key].get(k), dict)
                           for k in _CONTAINER_KEYS)):
                current = current[key]
                path.append(key)
                break
        else:
            break
    state_dict = _tensor_items(current)
    # Scalars beside the weights (a stored epoch) are not weights; a weight's
    # name holding something else (a dict, a number, a string) is a damaged
    # or crafted file, and dropping it would load the model's own value
    # there with only a "missing key" line.
    not_tensors = sorted(
        k for k, v in (current.items() if isinstance(current, dict) else ())
        if isinstance(k, str) and not isinstance(v, Tensor)
        and k.rsplit('.', 1)[-1] in _WEIGHT_NAMES)
    if not_tensors:
        key = not_tensors[0]
        where = '/'.join(path + [key])
        raise CheckpointError(
            f'checkpoint entry {where!r} is a {type(current[key]).__name__}, '
            f'not a tensor ({len(not_tensors)} such weight name(s): '
            f'{_brief(not_tensors)}); the file is damaged or was not saved '
            f'from a model\'s state_dict')
    if not state_dict:
        top = sorted(map(str, ckpt))[:10] if isinstance(ckpt, dict) else []
        raise CheckpointError(
            f'no dict of tensors found in the checkpoint: looked under '
            f'{list(_CONTAINER_KEYS)} and at the top level, whose keys are '
            f'{top}')
    return state_dict, '/'.join(path)


# ------------------------------------------------------------------- layout
def _strip_all(state_dict: Dict[str, Tensor],
               prefix: str) -> Dict[str, Tensor]:
    """Remove ``prefix`` when every key has it (a DataParallel artifact)."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _any_match(keys: Sequence[str], pattern: str) -> bool:
    regex = re.compile(pattern)
    return any(regex.match(k) for k in keys)


def detect_layout(state_dict: Dict[str, Tensor]) -> str:
    """Tell which codebase wrote a ViT state dict.

    Args:
        state_dict (dict): Tensor dict as returned by
            :func:`unwrap_state_dict`.

    Returns:
        str: One of :data:`KNOWN_LAYOUTS`: ``'timm'``, ``'mae'``,
        ``'mocov3'``, ``'mmpretrain'``, ``'mmseg'`` or ``'bpt_mm'``.

    Raises:
        CheckpointError: None matches; the message lists the known layouts
            and some of the keys seen.

    Examples:
        >>> w = torch.zeros(24, 8)
        >>> detect_layout({'backbone.layers.0.attn.attn.in_proj_weight': w})
        'mmseg'
    """
    keys = list(_strip_all(state_dict, 'module.'))
    bb = r'(backbone\.)?'
    # Prompts only exist in files this package wrote; a timm-named ViT under
    # 'backbone.' is also ours (mmpretrain/mmseg would use 'layers.').
    if _any_match(keys, bb + re.escape(_PROMPT_PREFIX)) or _any_match(
            keys, r'backbone\.blocks\.\d+\.attn\.qkv\.'):
        return 'bpt_mm'
    # MoCo v3 is checked before timm because its encoder uses timm names.
    if _any_match(keys,
                  r'(module\.)?base_encoder\.(pos_embed|cls_token|blocks\.)'):
        return 'mocov3'
    # nn.MultiheadAttention's fused in_proj is what sets mmseg apart.
    if _any_match(keys, bb + r'layers\.\d+\.attn\.attn\.in_proj_weight'):
        return 'mmseg'
    if _any_match(keys, bb + r'layers\.\d+\.(attn\.qkv\.|ffn\.layers\.)') \
            or _any_match(keys, bb + r'patch_embed\.projection\.'):
        return 'mmpretrain'
    timm_like = _any_match(keys, r'blocks\.\d+\.attn\.qkv\.') or (
        'pos_embed' in keys and 'patch_embed.proj.weight' in keys)
    # MAE's pre-training file is the timm encoder plus a decoder; DINOv2
    # also has a 'mask_token' but no decoder, and is plain timm.
    if timm_like and 'mask_token' in keys and any(
            k.startswith('decoder_') for k in keys):
        return 'mae'
    if timm_like:
        return 'timm'
    raise CheckpointError(
        f'unrecognised checkpoint layout: known layouts are '
        f'{list(KNOWN_LAYOUTS)}; some of the {len(keys)} keys seen: '
        f'{sorted(keys)[:8]}')


# --------------------------------------------------------------- conversion
# (pattern, replacement) pairs applied to the first match. Block keys are
# anchored on 'layers.{i}.' so a block's ln1 is never taken for the final
# ln1. Sources: mmpretrain's VisionTransformer / TransformerEncoderLayer and
# its deit3/clip converters; mmseg's VisionTransformer and vit2mmseg.
_MM_BLOCK_RULES: Tuple[Tuple[str, str], ...] = (
    (r'^layers\.(\d+)\.ln1\.', r'blocks.\1.norm1.'),
    (r'^layers\.(\d+)\.ln2\.', r'blocks.\1.norm2.'),
    (r'^layers\.(\d+)\.attn\.qkv\.', r'blocks.\1.attn.qkv.'),
    (r'^layers\.(\d+)\.attn\.proj\.', r'blocks.\1.attn.proj.'),
    (r'^layers\.(\d+)\.attn\.attn\.in_proj_weight$',
     r'blocks.\1.attn.qkv.weight'),
    (r'^layers\.(\d+)\.attn\.attn\.in_proj_bias$',
     r'blocks.\1.attn.qkv.bias'),
    (r'^layers\.(\d+)\.attn\.attn\.out_proj\.', r'blocks.\1.attn.proj.'),
    (r'^layers\.(\d+)\.attn\.gamma1\.weight$', r'blocks.\1.ls1.gamma'),
    (r'^layers\.(\d+)\.ffn\.layers\.0\.0\.', r'blocks.\1.mlp.fc1.'),
    (r'^layers\.(\d+)\.ffn\.layers\.1\.', r'blocks.\1.mlp.fc2.'),
    (r'^layers\.(\d+)\.ffn\.gamma2\.weight$', r'blocks.\1.ls2.gamma'),
    (r'^patch_embed\.projection\.', r'patch_embed.proj.'),
    (r'^ln1\.', r'norm.'),
    (r'^pre_norm\.', r'norm_pre.'),  # mmpretrain (CLIP-style pre-norm)
    (r'^ln_pre\.', r'norm_pre.'),  # mmseg
)
# Top-level mmpretrain 'ln2' normalises the pooled patch tokens
# (out_type='avg_featmap'), i.e. timm's fc_norm, which we drop as well.
_MM_DROP = (r'^ln2\.', )

# Parts of timm-named files that are not the backbone: classifier heads,
# pooled-feature norms, DeiT's distillation token, DINOv2's mask token.
_TIMM_DROP = (r'^head(\.|$)', r'^head_dist\.', r'^fc_norm\.',
              r'^pre_logits\.', r'^attn_pool\.', r'^dist_token$',
              r'^mask_token$')
_MAE_DROP = (r'^mask_token$', r'^decoder_')
# DeiT-3's original files store layer scale as blocks.{i}.gamma_1/_2.
_TIMM_RULES: Tuple[Tuple[str, str], ...] = (
    (r'^blocks\.(\d+)\.gamma_([12])$', r'blocks.\1.ls\2.gamma'), )


def _rename(key: str, rules: Sequence[Tuple[str, str]]) -> str:
    for pattern, repl in rules:
        new, count = re.subn(pattern, repl, key)
        if count:
            return new
    return key


def _drop_dist_pos(state_dict: Dict[str, Tensor]) -> None:
    """Remove the distillation token's row from a DeiT-distilled pos_embed.

    Distilled DeiT files place ``[cls, dist, patches...]`` positions; once
    ``dist_token`` is dropped its position row must go too, or every patch
    would be shifted by one.
    """
    pos = state_dict.get('pos_embed')
    # Only when the rows say [cls, dist, square grid]; anything else is left
    # for the pos_embed fitting step to judge.
    if pos is not None and pos.dim() == 3 and pos.shape[1] > 2 \
            and _square_side(pos.shape[1] - 2) is not None \
            and _square_side(pos.shape[1] - 1) is None:
        state_dict['pos_embed'] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)


def convert_to_timm_layout(
        state_dict: Dict[str, Tensor],
        layout: Optional[str] = None) -> Tuple[Dict[str, Tensor], List[str]]:
    """Rename a foreign ViT state dict to bpt_mm's (timm's) key names.

    Keys that belong to parts our backbone does not have (heads, MAE
    decoder and mask token, MoCo momentum encoder and predictor, fc_norm,
    distillation token, segmentation heads...) are dropped and returned by
    their original names so the caller can report them. Keys no rule knows
    are kept unchanged, so that loading reports them as unexpected rather
    than losing them silently.

    Args:
        state_dict (dict): Tensor dict as returned by
            :func:`unwrap_state_dict`; it is not modified.
        layout (str, optional): One of :data:`KNOWN_LAYOUTS`. Detected with
            :func:`detect_layout` when None.

    Returns:
        tuple[dict, list[str]]: The converted dict (tensors are shared, not
        copied) and the sorted original names of the dropped keys.

    Raises:
        CheckpointError: ``layout`` is unknown or cannot be detected.

    Examples:
        >>> from bpt_mm.models import PromptedViT
        >>> vit = PromptedViT(arch=dict(embed_dims=16, num_layers=1,
        ...                              num_heads=2), img_size=32,
        ...                   patch_size=16)
        >>> mae = {k: v for k, v in vit.state_dict().items()
        ...        if not k.startswith('_')}  # an MAE pretraining file:
        >>> mae.update(mask_token=torch.zeros(1, 1, 16),
        ...            **{'decoder_embed.weight': torch.zeros(8, 16)})
        >>> sd, dropped = convert_to_timm_layout(mae)
        >>> dropped, 'blocks.0.attn.qkv.weight' in sd
        (['decoder_embed.weight', 'mask_token'], True)
    """
    if layout is None:
        layout = detect_layout(state_dict)
    if layout not in KNOWN_LAYOUTS:
        raise CheckpointError(f'unknown layout {layout!r}; known layouts are '
                              f'{list(KNOWN_LAYOUTS)}')
    # Work on (original name, current name, tensor) so drops keep the names
    # the user would find in the file.
    items = [(k, k, v) for k, v in state_dict.items()]
    dropped: List[str] = []

    def keep_prefix(*prefixes: str, only_if_any: bool = True) -> None:
        """Keep keys under one of ``prefixes`` (stripped), drop the rest."""
        nonlocal items
        if only_if_any and not any(cur.startswith(prefixes)
                                   for _, cur, _ in items):
            return
        kept = []
        for orig, cur, v in items:
            hit = next((p for p in prefixes if cur.startswith(p)), None)
            if hit is not None:
                kept.append((orig, cur[len(hit):], v))
            else:
                dropped.append(orig)
        items = kept

    def drop(patterns: Sequence[str]) -> None:
        nonlocal items
        regexes = [re.compile(p) for p in patterns]
        kept = []
        for orig, cur, v in items:
            if any(r.match(cur) for r in regexes):
                dropped.append(orig)
            else:
                kept.append((orig, cur, v))
        items = kept

    def rename(rules: Sequence[Tuple[str, str]]) -> None:
        nonlocal items
        items = [(orig, _rename(cur, rules), v) for orig, cur, v in items]

    # A DataParallel 'module.' on every key carries no information.
    if items and all(cur.startswith('module.') for _, cur, _ in items):
        items = [(o, c[len('module.'):], v) for o, c, v in items]

    if layout == 'bpt_mm':
        # Whole-detector/segmentor files: only the backbone is ours.
        keep_prefix('backbone.')
    elif layout == 'mocov3':
        # main_lincls.py keeps base_encoder minus its head (the projection
        # MLP); the momentum encoder and predictor only serve pre-training.
        keep_prefix('base_encoder.', 'module.base_encoder.',
                    only_if_any=False)
        drop(_TIMM_DROP)
        rename(_TIMM_RULES)
    elif layout in ('mmpretrain', 'mmseg'):
        keep_prefix('backbone.')
        drop(_MM_DROP)
        rename(_MM_BLOCK_RULES)
    elif layout == 'mae':
        drop(_MAE_DROP)
        drop(_TIMM_DROP)
        rename(_TIMM_RULES)
    else:  # timm
        drop(_TIMM_DROP)
        rename(_TIMM_RULES)

    out: Dict[str, Tensor] = {}
    for orig, cur, v in items:
        if cur in out:  # two rules landed on one name: refuse to guess
            raise CheckpointError(f'converting the {layout} checkpoint maps '
                                  f'two keys to {cur!r} (one is {orig!r})')
        out[cur] = v
    if 'dist_token' not in out and any(
            re.fullmatch(r'(.+\.)?dist_token', k) for k in dropped):
        _drop_dist_pos(out)
    return out, sorted(dropped)


# ---------------------------------------------------------- position embed
def _square_side(n: int) -> Optional[int]:
    side = math.isqrt(n) if n >= 0 else 0
    return side if side * side == n and side > 0 else None


def resample_pos_embed(pos_embed: Tensor,
                       new_grid: Tuple[int, int],
                       num_prefix_tokens: int = 1,
                       old_grid: Optional[Tuple[int, int]] = None,
                       antialias: bool = False) -> Tensor:
    """Bicubically resample the grid part of an absolute position embedding.

    The first ``num_prefix_tokens`` rows (class token etc.) are kept as they
    are; the rest is reshaped to ``old_grid``, interpolated to ``new_grid``
    and flattened back. By default the interpolation is plain bicubic
    (``align_corners=False``, no antialiasing), the formula of MAE's
    ``interpolate_pos_embed``, ViTDet's ``get_abs_pos`` and mmseg's
    ``resize_pos_embed``; ``antialias=True`` is timm's
    ``resample_abs_pos_embed`` (antialiased bicubic, whose kernel differs
    even when upsampling: about 3e-3 relative from 14x14 to 64x64).

    Args:
        pos_embed (Tensor): ``(1, num_prefix_tokens + H*W, C)``.
        new_grid (tuple[int, int]): Target ``(h, w)`` in patches.
        num_prefix_tokens (int): Leading rows that are not on the grid.
            Defaults to 1.
        old_grid (tuple[int, int], optional): Source ``(H, W)``; when None
            the grid is taken to be square.
        antialias (bool): timm's antialiased resampling instead of the
            plain bicubic one. Defaults to False.

    Returns:
        Tensor: ``(1, num_prefix_tokens + h*w, C)`` in the input dtype.

    Raises:
        ValueError: The tensor is not ``(1, L, C)``, or the grid size cannot
            be inferred (not a square) or disagrees with ``old_grid``.

    Examples:
        >>> resample_pos_embed(torch.zeros(1, 197, 768), (32, 32)).shape
        torch.Size([1, 1025, 768])
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f'pos_embed must be (1, L, C), got '
                         f'{tuple(pos_embed.shape)}')
    num_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = _square_side(num_grid)
        if side is None:
            raise ValueError(
                f'cannot infer the grid of a pos_embed with {num_grid} '
                f'positions after {num_prefix_tokens} prefix token(s): not a '
                f'square; pass old_grid')
        old_grid = (side, side)
    old_grid = (int(old_grid[0]), int(old_grid[1]))
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if old_grid[0] * old_grid[1] != num_grid:
        raise ValueError(f'old_grid {old_grid} has {old_grid[0] * old_grid[1]}'
                         f' positions but pos_embed has {num_grid}')
    if old_grid == new_grid:
        return pos_embed
    if antialias:
        return resample_abs_pos_embed(pos_embed, new_size=list(new_grid),
                                      old_size=list(old_grid),
                                      num_prefix_tokens=num_prefix_tokens)
    dim = pos_embed.shape[-1]
    prefix = pos_embed[:, :num_prefix_tokens]
    grid = pos_embed[:, num_prefix_tokens:].reshape(
        1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    # float32 at least: bicubic kernels are not implemented for every
    # half type on every device.
    work = torch.promote_types(grid.dtype, torch.float32)
    grid = F.interpolate(grid.to(work), size=new_grid, mode='bicubic',
                         align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def _model_pos_prefix(model: torch.nn.Module,
                      model_sd: Dict[str, Tensor]) -> int:
    """Rows of the model's pos_embed that precede the patch grid."""
    if getattr(model, 'no_embed_class', False):  # timm: no prefix positions
        return 0
    prefix = getattr(model, 'num_prefix_tokens', None)
    if isinstance(prefix, int):
        return prefix
    return 1 if 'cls_token' in model_sd else 0


def _model_grid(model: torch.nn.Module, num_grid: int) -> Tuple[int, int]:
    grid = getattr(getattr(model, 'patch_embed', None), 'grid_size', None)
    if grid is not None and len(grid) == 2:
        return int(grid[0]), int(grid[1])
    side = _square_side(num_grid)
    if side is None:
        raise CheckpointError(f"cannot tell the model's patch grid: its "
                              f'pos_embed has {num_grid} grid positions and '
                              f'it has no patch_embed.grid_size')
    return side, side


def _fit_pos_embed(ckpt_pos: Tensor, model_pos: Tensor, ckpt_has_cls: bool,
                   model: torch.nn.Module, model_sd: Dict[str, Tensor]
                   ) -> Tuple[Tensor, Optional[Tuple[Tuple[int, int],
                                                     Tuple[int, int]]]]:
    """Bring the checkpoint's pos_embed onto the model's grid.

    Returns the tensor and, if it was resampled, ``(old_grid, new_grid)``.
    Embedding widths are left alone: a width mismatch is a different model
    and is reported by the shape check.
    """
    if ckpt_pos.dim() != 3 or model_pos.dim() != 3 \
            or ckpt_pos.shape[-1] != model_pos.shape[-1]:
        return ckpt_pos, None
    model_prefix = _model_pos_prefix(model, model_sd)
    model_grid = _model_grid(model, model_pos.shape[1] - model_prefix)
    # Files from models with no position for the class token (timm's
    # no_embed_class) still hold a cls_token: trust the square.
    ckpt_prefix = None
    for cand in ((1, 0) if ckpt_has_cls else (0, 1)):
        if _square_side(ckpt_pos.shape[1] - cand) is not None:
            ckpt_prefix = cand
            break
    if ckpt_prefix is None:
        if ckpt_pos.shape == model_pos.shape:
            return ckpt_pos, None  # non-square but identical: nothing to do
        raise CheckpointError(
            f'cannot resample pos_embed {tuple(ckpt_pos.shape)} to '
            f'{tuple(model_pos.shape)}: its grid is not square, so its shape '
            f'is unknown')
    if ckpt_prefix < model_prefix:
        raise CheckpointError(
            f'pos_embed {tuple(ckpt_pos.shape)} has no position for the '
            f"model's class token (model pos_embed "
            f'{tuple(model_pos.shape)}): the file comes from a ViT that adds '
            f'the class token without a position (DeiT III, timm\'s '
            f'no_embed_class); set `no_embed_class` to True')
    if ckpt_prefix > model_prefix and 'cls_token' in model_sd:
        # The model has a class token but no position for it: dropping the
        # file's would change the class token's input, so refuse.
        raise CheckpointError(
            f'pos_embed {tuple(ckpt_pos.shape)} has a position for the '
            f'class token, but the model is built without one (model '
            f'pos_embed {tuple(model_pos.shape)}); set `no_embed_class` to '
            f'False')
    if ckpt_prefix > model_prefix:
        # The model has no class token: drop its position, as mmpretrain
        # does for with_cls_token=False.
        ckpt_pos = ckpt_pos[:, ckpt_prefix - model_prefix:]
    side = _square_side(ckpt_pos.shape[1] - model_prefix)
    old_grid = (side, side)
    if old_grid == model_grid:
        return ckpt_pos, None
    resized = resample_pos_embed(
        ckpt_pos, model_grid, model_prefix, old_grid,
        antialias=bool(getattr(model, 'pos_embed_antialias', False)))
    return resized, (old_grid, model_grid)


# ------------------------------------------------------------------- limits
#: A checkpoint tensor may hold at most this many times the elements of the
#: model's tensor of the same name: enough for a position embedding of a
#: 4x finer grid (e.g. 518 px DINOv2 into a 224 px model: 7x), not for one
#: that would take minutes and gigabytes to resample.
MAX_TENSOR_FACTOR = 16


def check_tensor_limits(state_dict: Dict[str, Tensor],
                        model_sd: Dict[str, Tensor], path: str) -> None:
    """Refuse checkpoint tensors far larger than the model's, before any
    work is done on them.

    A tensor's size is what its shape claims, whatever its storage: a
    stride-0 ``pos_embed`` of a huge grid costs a few bytes in the file and
    minutes of resampling.

    Args:
        state_dict (dict): The checkpoint's tensors, in the model's names.
        model_sd (dict): The model's state dict.
        path (str): The file, for the message.

    Raises:
        CheckpointError: Naming the key, its shape and the limit.
    """
    for key, value in state_dict.items():
        mine = model_sd.get(key)
        if mine is None:
            continue
        limit = MAX_TENSOR_FACTOR * max(mine.numel(), 1)
        if value.numel() > limit:
            raise CheckpointError(
                f'refusing checkpoint {path!r}: {key!r} has shape '
                f'{_shape(value)} ({value.numel()} elements), more than '
                f'{MAX_TENSOR_FACTOR} times the model\'s {_shape(mine)} '
                f'(limit {limit} elements)')


# ------------------------------------------------------ architecture options
#: Parts of a ViT that a checkpoint either has or lacks, the PromptedViT
#: option that builds them, and the value that fits a file with / without
#: them. A file and a model that disagree on one of these would load into
#: wrong features (a random patch bias, a missing pre-norm or layer scale),
#: so the load is refused with the option named.
ARCHITECTURE_OPTIONS: Tuple[Tuple[str, str, str, str], ...] = (
    (r'patch_embed\.proj\.bias$', 'patch_bias', 'True', 'False'),
    (r'norm_pre\.', 'pre_norm', 'True', 'False'),
    (r'blocks\.\d+\.ls[12]\.gamma$', 'layer_scale_init_value',
     'a positive number (the checkpoint\'s values replace it)', 'None'),
    (r'blocks\.\d+\.attn\.qkv\.bias$', 'qkv_bias', 'True', 'False'),
)


def architecture_mismatch(checkpoint_keys: Sequence[str],
                          model_keys: Sequence[str]) -> List[str]:
    """What a checkpoint's architecture needs that the model is not built
    with, as one readable line per :data:`ARCHITECTURE_OPTIONS` entry.

    Args:
        checkpoint_keys (Sequence[str]): Keys of the converted (timm-named)
            checkpoint.
        model_keys (Sequence[str]): Keys of the model's state dict.

    Returns:
        list[str]: Empty when they agree.
    """
    lines = []
    for pattern, option, with_it, without_it in ARCHITECTURE_OPTIONS:
        regex = re.compile(pattern)
        in_file = sorted(k for k in checkpoint_keys if regex.match(k))
        in_model = sorted(k for k in model_keys if regex.match(k))
        if in_file and not in_model:
            lines.append(f'the checkpoint has {_brief(in_file, 3)}, which '
                         f'the model has no place for: set `{option}` to '
                         f'{with_it}')
        elif in_model and not in_file:
            lines.append(f'the checkpoint has no {_brief(in_model, 3)}, '
                         f'which the model would keep at random: set '
                         f'`{option}` to {without_it}')
    return lines


# ------------------------------------------------------------------ loading
def _report(logger: Any, level: str, message: str) -> None:
    if logger is not None:
        getattr(logger, level)(message)
    elif level == 'warning':
        warnings.warn(message, UserWarning, stacklevel=3)


def _shape(t: Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def load_pretrained(model: torch.nn.Module,
                    path: str,
                    strict_shapes: bool = True,
                    logger: Any = None,
                    name: Optional[str] = None) -> Dict[str, Any]:
    """Load a pretrained ViT file of any known layout into ``model``.

    Reads ``path`` (weights only), unwraps the container, detects and
    converts the layout, strips a ``backbone.`` prefix, drops or resamples
    ``pos_embed`` onto the model's own patch grid (plain bicubic, or timm's
    antialiased resampling when the model's ``pos_embed_antialias`` is
    True), checks that file and model agree on the architecture options
    (:func:`architecture_mismatch`) and that the file has no weight the
    model cannot hold, checks every shared key's shape and loads with
    ``strict=False``.

    Args:
        model (torch.nn.Module): A module with timm ViT names, e.g.
            ``PromptedViT`` or ``timm``'s ``VisionTransformer``.
        path (str): Checkpoint file.
        strict_shapes (bool): If True, any shape mismatch raises
            :class:`CheckpointError`; if False those keys are skipped and
            reported under ``'mismatched'``. Defaults to True.
        logger (logging.Logger | mmengine.logging.MMLogger, optional): Gets
            one ``info``/``warning`` line per non-empty category. Without
            it, missing, unexpected and mismatched keys are reported with
            :func:`warnings.warn`.
        name (str, optional): The checkpoint as the user named it (a URL,
            a file-backend name), for the report lines: ``path`` may be a
            temporary copy deleted after loading. Defaults to ``path``.

    Returns:
        dict: ``layout`` (str), ``container`` (str), ``missing`` (model keys
        the file lacks, prompt keys excluded), ``new_prompt_keys``
        (``prompts.*`` keys left at their initialisation, expected),
        ``unexpected`` (always empty: such keys are refused), ``dropped``
        (file keys
        removed on conversion: heads, decoders...), ``mismatched`` (``{key:
        (file shape, model shape)}``, only with ``strict_shapes=False``) and
        ``pos_embed_resized`` (``(old_grid, new_grid)`` or None).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: The file cannot be read safely, its layout is
            unknown, it has or lacks a part the model is built without or
            with (the message names the keys and the option to set, e.g.
            ``patch_bias=False``), it has weights the model has no place
            for (other than the known irrelevant ones: heads, MAE decoder,
            mask token, MoCo momentum encoder and predictor...), or a shape
            differs (with ``strict_shapes``); the message names the key and
            both shapes.

    Examples:
        >>> import os.path as osp, tempfile
        >>> from bpt_mm.models import PromptedViT
        >>> def vit():
        ...     return PromptedViT(arch=dict(embed_dims=16, num_layers=1,
        ...                                  num_heads=2), img_size=32,
        ...                        patch_size=16)
        >>> weights = {k: v for k, v in vit().state_dict().items()
        ...            if not k.startswith('_')}
        >>> weights.update(mask_token=torch.zeros(1, 1, 16),  # MAE's
        ...                **{'decoder_embed.weight': torch.zeros(8, 16)})
        >>> path = osp.join(tempfile.mkdtemp(), 'mae_pretrain.pth')
        >>> torch.save({'model': weights}, path)
        >>> info = load_pretrained(vit(), path)
        >>> info['layout'], info['missing']
        ('mae', [])
    """
    ckpt = load_checkpoint_file(path)
    try:
        state_dict, container = unwrap_state_dict(ckpt)
    except CheckpointError as exc:  # it cannot know the file: name it
        raise CheckpointError(f'pretrained checkpoint {path!r}: {exc}') \
            from None
    # A bpt_mm file's record of the backbone it was made from (module extra
    # state, see bpt_mm.models.frozen_state) is not a weight.
    records = sorted(k for k in state_dict
                     if k.endswith(torch.nn.modules.module
                                   ._EXTRA_STATE_KEY_SUFFIX))
    for key in records:
        state_dict.pop(key)
    layout = detect_layout(state_dict)
    converted, dropped = convert_to_timm_layout(state_dict, layout)
    dropped = sorted(dropped + records)

    # Layouts whose converter does not already strip it (or a bare backbone
    # saved from a wrapper) may still carry 'backbone.'.
    if any(k.startswith('backbone.') for k in converted):
        rest = [k for k in converted if not k.startswith('backbone.')]
        dropped = sorted(dropped + rest)
        converted = {k[len('backbone.'):]: v for k, v in converted.items()
                     if k.startswith('backbone.')}

    model_sd = model.state_dict()
    ckpt_has_cls = 'cls_token' in converted
    if ckpt_has_cls and 'cls_token' not in model_sd \
            and _model_pos_prefix(model, model_sd) == 0:
        # A backbone built without a class token: its weights have no use.
        converted.pop('cls_token')
        dropped = sorted(dropped + ['cls_token'])

    check_tensor_limits(converted, model_sd, path)
    # Which weights the file has is checked before any value is fitted:
    # a part the model lacks (register tokens, q/k norms) is named as such,
    # not as the position-embedding shape it also changes.
    mismatch = architecture_mismatch(list(converted), list(model_sd))
    if mismatch:
        raise CheckpointError(
            f'{layout} checkpoint {path!r} does not fit the model as built: '
            + '; '.join(mismatch) + ' (PromptedViT options)')
    unused = sorted(k for k in converted if k not in model_sd)
    if unused:
        # Keys known to be irrelevant (heads, MAE decoder and mask token,
        # MoCo's momentum encoder and predictor...) were already dropped by
        # name; anything else is a weight of the network in the file.
        raise CheckpointError(
            f'{layout} checkpoint {path!r} has {len(unused)} weight(s) the '
            f'model has no place for: {_brief(unused)}. They belong to an '
            f'architecture PromptedViT was not built as (or cannot be); '
            f'loading without them would give other features than the '
            f'checkpoint\'s network')

    resized = None
    if 'pos_embed' in converted and 'pos_embed' in model_sd:
        converted['pos_embed'], resized = _fit_pos_embed(
            converted['pos_embed'], model_sd['pos_embed'], ckpt_has_cls,
            model, model_sd)

    # In the model's order, so the first lines name the stem (cls_token,
    # pos_embed, patch_embed), which usually tells the story.
    mismatched = {
        k: (_shape(converted[k]), _shape(v))
        for k, v in model_sd.items()
        if k in converted and _shape(converted[k]) != _shape(v)
    }
    if mismatched and strict_shapes:
        lines = '; '.join(f'{k}: checkpoint {a} vs model {b}'
                          for k, (a, b) in list(mismatched.items())[:6])
        more = len(mismatched) - 6
        raise CheckpointError(
            f'shape mismatch loading {layout} checkpoint {path!r} '
            f'({len(mismatched)} key(s)): {lines}'
            + (f'; and {more} more' if more > 0 else '')
            + '. Is the model configured like the checkpoint (embed dims, '
            'patch size, depth)?')
    for k in mismatched:
        converted.pop(k)
    bad = non_finite_tensors(converted)
    if bad:
        raise CheckpointError(
            f'{layout} checkpoint {path!r} holds NaN/Inf values in {bad}'
            f'{" (and maybe more)" if len(bad) == 5 else ""}: the file is '
            'corrupt or was saved from a run that diverged; refusing to '
            'load it')

    result = model.load_state_dict(converted, strict=False)
    missing_all = list(result.missing_keys)
    new_prompt_keys = [k for k in missing_all if k.startswith(_PROMPT_PREFIX)]
    # Shape-skipped keys are reported once, under 'mismatched'.
    missing = [k for k in missing_all
               if not k.startswith(_PROMPT_PREFIX) and k not in mismatched]
    unexpected = list(result.unexpected_keys)

    info: Dict[str, Any] = dict(
        layout=layout, container=container, missing=missing,
        new_prompt_keys=new_prompt_keys, unexpected=unexpected,
        dropped=dropped, mismatched=mismatched, pos_embed_resized=resized)

    # Report the name the user gave, not a (deleted) temporary copy.
    shown = path if name is None else name
    where = f'{shown} ({layout} layout'
    where += f", under '{container}')" if container else ')'
    loaded = len(converted) - len(unexpected)
    _report(logger, 'info', f'load_pretrained: {loaded} tensors loaded from '
            f'{where}')
    if dropped:
        _report(logger, 'info', f'load_pretrained: dropped {len(dropped)} '
                f'keys the backbone does not use: {_brief(dropped)}')
    if resized:
        _report(logger, 'info', f'load_pretrained: resampled pos_embed grid '
                f'{resized[0]} -> {resized[1]}')
    if new_prompt_keys:
        _report(logger, 'info', f'load_pretrained: {len(new_prompt_keys)} '
                f'prompt parameters keep their initialisation: '
                f'{_brief(new_prompt_keys)}')
    if missing:
        _report(logger, 'warning', f'load_pretrained: {len(missing)} model '
                f'keys missing from {shown}: {_brief(missing)}')
    if mismatched:
        _report(logger, 'warning', 'load_pretrained: skipped for shape: '
                + ', '.join(f'{k} {a} vs {b}'
                            for k, (a, b) in mismatched.items()))
    return info


def _brief(keys: Sequence[str], limit: int = 12) -> str:
    """A bounded, readable list for one log line."""
    keys = list(keys)
    shown = ', '.join(keys[:limit])
    return shown + (f', ... (+{len(keys) - limit})' if len(keys) > limit
                    else '')
