"""The whitening file: per-block ``W`` (and ``Sigma``) computed once and
reused (torch only).

:func:`save_whitening` writes :func:`~bpt_mm.whitening.collect.
collect_whitening` results with a header describing the backbone and the
options; :func:`load_whitening` reads one with torch's ``weights_only``
loader and refuses, naming the file and the key, a file that is not one, is
for another backbone or other weights, or holds a value no whitening has.
``tools/compute_whitening.py`` writes it; ``BPTWhiteningHook(
whitening_file=...)`` reads it.
"""
import math
import os
import os.path as osp
from typing import TYPE_CHECKING, Any, Dict, Tuple, Union

import torch
from torch import Tensor

from bpt_mm.safe_load import CheckpointError, load_weights_only
from .collect import whitening_blocks
from .options import WhiteningOptions

if TYPE_CHECKING:  # pragma: no cover
    from bpt_mm.models import PromptedViT

__all__ = ['FILE_FORMAT', 'FILE_VERSION', 'save_whitening', 'load_whitening']

#: ``format`` entry of a whitening file.
FILE_FORMAT = 'bpt_mm.whitening'
#: ``version`` entry of a whitening file written by this code.
FILE_VERSION = 1
# Relative tolerance on the qkv-weight fingerprint stored in a file: float
# reductions on another device differ by ~1e-15, another checkpoint by far
# more than this.
_FINGERPRINT_RTOL = 1e-4
# Header entries every version-1 file has, besides those compared with the
# model (format, version, embed_dims, num_layers, patch_size) and blocks.
_HEADER_KEYS = ('num_heads', 'num_images', 'layers', 'prompt_type',
                'prompt_depth', 'statistics')
# Every key a file may hold (every version-1 writer wrote these and no
# other): anything else is a hand edit or another tool's file, and is
# refused by name rather than ignored.
_FILE_KEYS = ('format', 'version', 'embed_dims', 'num_layers', 'patch_size',
              'blocks') + _HEADER_KEYS
_BLOCK_KEYS = ('whitening', 'sigma', 'num_tokens', 'num_dropped_tokens',
               'num_images', 'condition_number', 'qkv_fingerprint')


def _fingerprint(backbone: 'PromptedViT', block: int) -> float:
    weight = backbone.blocks[block].attn.qkv.weight.detach()
    return float(weight.to(torch.float64).norm())


def save_whitening(path: Union[str, os.PathLike],
                   results: Dict[int, Dict[str, Any]],
                   backbone: 'PromptedViT',
                   options: WhiteningOptions) -> None:
    """Save :func:`collect_whitening` results as a torch file.

    The file holds tensors and plain types only (it loads with
    ``weights_only=True``): ``format``, ``version``, ``embed_dims``,
    ``num_layers``, ``num_heads``, ``patch_size``, ``prompt_type``,
    ``prompt_depth``, ``layers`` (the blocks it has), ``statistics`` (the
    options that define ``Sigma`` and ``W``, see
    :meth:`~bpt_mm.whitening.options.WhiteningOptions.statistic_fields`),
    ``num_images`` and ``blocks`` = {block: dict(
    whitening, sigma, num_tokens, num_images, condition_number,
    qkv_fingerprint)}. The fingerprint (the norm of the block's
    ``qkv.weight``) lets :func:`load_whitening` refuse a file computed for
    other backbone weights. Written atomically (temporary file + rename).

    Args:
        path (str | os.PathLike): The file to write.
        results (dict): :func:`collect_whitening`'s ``{block: result}``;
            not empty.
        backbone (PromptedViT): The backbone the results were computed on
            (its arch, prompts and ``qkv`` fingerprints go into the file).
        options (WhiteningOptions): The options the results were computed
            with.
    """
    if not results:
        raise ValueError('no whitening results to save')
    if not isinstance(options, WhiteningOptions):
        raise ValueError('`options` must be a WhiteningOptions, got '
                         f'{type(options).__name__}')
    config = backbone.prompt_config
    blocks = {}
    for block in sorted(results):
        result = results[block]
        entry = {
            'whitening': result['whitening'].detach().cpu().to(
                torch.float32).contiguous(),
            'num_tokens': int(result['num_tokens']),
            'num_dropped_tokens': int(result.get('num_dropped_tokens', 0)),
            'num_images': int(result['num_images']),
            'condition_number': float(result['condition_number']),
            'qkv_fingerprint': _fingerprint(backbone, block),
        }
        if result.get('sigma') is not None:
            entry['sigma'] = result['sigma'].detach().cpu().to(
                torch.float64).contiguous()
        blocks[int(block)] = entry
    payload = {
        'format': FILE_FORMAT,
        'version': FILE_VERSION,
        'embed_dims': int(backbone.embed_dims),
        'num_layers': int(backbone.num_layers),
        'num_heads': int(backbone.num_heads),
        'patch_size': int(backbone.patch_size),
        'prompt_type': None if config is None else config.type,
        'prompt_depth': None if config is None else config.depth,
        'layers': sorted(blocks),
        'statistics': options.statistic_fields(),
        'num_images': max(b['num_images'] for b in blocks.values()),
        'blocks': blocks,
    }
    path = os.fspath(path)
    parent = osp.dirname(osp.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _refuse(path: str, why: str) -> ValueError:
    return ValueError(f'whitening file {path!r} does not fit this model: '
                      f'{why}')


def _typed_field(path: str, key: str, value: Any,
                 types: Union[type, Tuple[type, ...]]) -> Any:
    """``value`` if it is of ``types`` (never a bool, never a tensor), else
    a ValueError naming the file and the key."""
    if isinstance(value, types) and not isinstance(value, bool):
        return value
    names = ' or '.join(t.__name__ for t in (
        types if isinstance(types, tuple) else (types, )))
    shown = (f'a {value.dtype} tensor' if isinstance(value, Tensor)
             else f'{value!r} ({type(value).__name__})')
    raise ValueError(f'whitening file {path!r}: `{key}` must be {names}, got '
                     f'{shown[:200]}')


def _check_zca(path: str, block: int, matrix: Tensor) -> None:
    """Refuse a whitening matrix that no ZCA whitening gives.

    :func:`~bpt_mm.whitening.linalg.zca_whitening_matrix` writes
    ``U diag((S + reg)^{-1/2}) U^T``: exactly symmetric and positive
    definite. A zero, singular, indefinite or non-symmetric matrix (a
    damaged or hand-made file) would otherwise become the prompts'
    projection without any error (all prompts collapsed onto a subspace,
    or flipped).
    """
    w = matrix.detach().to(torch.float64)
    scale = float(w.abs().max())
    if scale == 0.0:
        raise _refuse(path, f'block {block}: the whitening matrix is all '
                      'zeros; a ZCA whitening matrix is positive definite')
    asym = float((w - w.T).abs().max()) / scale
    if asym > 1e-5:
        raise _refuse(path, f'block {block}: the whitening matrix is not '
                      f'symmetric (largest |W - W^T| is {asym:.3g} of its '
                      f'largest entry); tools/compute_whitening.py writes '
                      f'the symmetric ZCA matrix')
    smallest = float(torch.linalg.eigvalsh((w + w.T) / 2)[0])
    if not smallest > 0.0:
        raise _refuse(path, f'block {block}: the whitening matrix is not '
                      f'positive definite (smallest eigenvalue '
                      f'{smallest:.3g}); a ZCA whitening matrix is')


def _real_matrix(path: str, block: int, name: str, value: Any,
                 dim: int) -> Tensor:
    """``blocks[block][name]`` if it is a dense, real floating (dim, dim)
    tensor, else a ValueError naming the file and the key (a complex matrix
    is refused, never cast)."""
    key = f'blocks[{block}].{name}'
    if not isinstance(value, Tensor):
        raise ValueError(f'whitening file {path!r}: `{key}` must be a '
                         f'({dim}, {dim}) tensor, got {type(value).__name__}')
    if value.layout != torch.strided or not value.dtype.is_floating_point:
        raise ValueError(f'whitening file {path!r}: `{key}` must be a dense '
                         f'real floating-point tensor, got a {value.dtype} '
                         f'{value.layout} tensor')
    if tuple(value.shape) != (dim, dim):
        raise _refuse(path, f'block {block}: `{key}` must be ({dim}, {dim}), '
                      f'got {tuple(value.shape)}')
    return value



def _count_field(path: str, key: str, value: Any, minimum: int = 0) -> int:
    """``value`` if it is an int ``>= minimum``, else a ValueError naming
    the file and the key."""
    value = _typed_field(path, key, value, int)
    if value < minimum:
        raise ValueError(f'whitening file {path!r}: `{key}` must be an int '
                         f'>= {minimum}, got {value}')
    return value


def _shown(value: Any) -> str:
    """``repr(value)``, cut short (a crafted file may hold anything)."""
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + '...'


def _check_header(path: str, payload: Dict[str, Any],
                  stored: Dict[Any, Any]) -> None:
    """Refuse header fields of a wrong type or an impossible value
    (ValueError naming the file and the key): ``num_heads`` (dividing
    ``embed_dims``), ``num_images``, ``layers`` (the blocks the file has),
    ``prompt_type``, ``prompt_depth`` and ``statistics`` (options a
    :class:`~bpt_mm.whitening.options.WhiteningOptions` accepts); and
    ``blocks`` keys that are not block indices."""
    num_layers = payload['num_layers']
    embed_dims = payload['embed_dims']
    for key in _HEADER_KEYS:
        if key not in payload:
            raise ValueError(f'whitening file {path!r} lacks `{key}`; '
                             'tools/compute_whitening.py writes it')
    unknown = sorted(set(payload) - set(_FILE_KEYS), key=str)
    if unknown:
        raise ValueError(f'whitening file {path!r} has unknown entries '
                         f'{_shown(unknown)}; a whitening file holds only '
                         f'{sorted(_FILE_KEYS)}')
    num_heads = _count_field(path, 'num_heads', payload['num_heads'], 1)
    if embed_dims % num_heads:
        raise ValueError(f'whitening file {path!r}: `num_heads`={num_heads} '
                         f'does not divide `embed_dims`={embed_dims}')
    _count_field(path, 'num_images', payload['num_images'], 1)
    bad = [k for k in stored if isinstance(k, bool) or not isinstance(k, int)
           or not 0 <= k < num_layers]
    if bad:
        raise ValueError(f'whitening file {path!r}: `blocks` has keys '
                         f'{_shown(bad[:5])}, which are not block indices in '
                         f'[0, {num_layers})')
    layers = payload['layers']
    if not isinstance(layers, (list, tuple)) \
            or list(layers) != sorted(stored):
        raise ValueError(f'whitening file {path!r}: `layers` must list the '
                         f'blocks it holds, {sorted(stored)}, got '
                         f'{_shown(layers)}')
    prompt_type = payload['prompt_type']
    if prompt_type is not None and not isinstance(prompt_type, str):
        raise ValueError(f'whitening file {path!r}: `prompt_type` must be a '
                         f'prompt type name, got {_shown(prompt_type)}')
    depth = payload['prompt_depth']
    if depth not in (None, 'shallow', 'deep'):
        raise ValueError(f'whitening file {path!r}: `prompt_depth` must be '
                         f"'shallow' or 'deep', got {_shown(depth)}")
    statistics = payload['statistics']
    fields = WhiteningOptions().statistic_fields()
    if not isinstance(statistics, dict):
        raise ValueError(f'whitening file {path!r}: `statistics` must be a '
                         f'dict of the options {sorted(fields)}, got '
                         f'{_shown(statistics)}')
    unknown = sorted(set(statistics) - set(fields), key=str)
    missing = sorted(set(fields) - set(statistics))
    if unknown or missing:
        raise ValueError(f'whitening file {path!r}: `statistics` must hold '
                         f'the options {sorted(fields)}; unknown: '
                         f'{_shown(unknown)}, missing: {missing}')
    try:
        WhiteningOptions(**statistics)
    except ValueError as exc:
        raise ValueError(f'whitening file {path!r}: `statistics`: '
                         f'{exc}') from exc


def load_whitening(path: Union[str, os.PathLike],
                   backbone: 'PromptedViT',
                   return_info: bool = False,
                   check_weights: bool = True
                   ) -> Union[Dict[int, Dict[str, Any]],
                              Tuple[Dict[int, Dict[str, Any]],
                                    Dict[str, Any]]]:
    """Read a :func:`save_whitening` file for ``backbone``.

    Refuses (ValueError naming the file and the mismatch) a file that is not
    a whitening file, or is for another ``embed_dims``, ``num_layers`` or
    ``patch_size``, lacks a block whose prompt needs whitening, holds a
    matrix that is not ``(d, d)`` and finite, or (with ``check_weights``)
    was computed with other ``qkv`` weights.

    Args:
        path (str | PathLike): The file.
        backbone (PromptedViT): The model it is for.
        return_info (bool): Also return the file's header (everything but
            ``blocks``). Defaults to False.
        check_weights (bool): Compare the stored qkv-weight fingerprints.
            Defaults to True.

    Returns:
        dict[int, dict] | tuple[dict, dict]: Results for the blocks of
        ``backbone`` that need whitening, in :func:`collect_whitening`'s
        format (without ``seconds``), ready for :func:`apply_whitening`;
        and the header when ``return_info``.
    """
    path = os.fspath(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'whitening file {path!r} does not exist')
    try:
        payload = load_weights_only(path, what='whitening file')
    except CheckpointError as exc:
        raise ValueError(f'{path!r} is not a readable whitening file: '
                         f'{exc}') from exc
    if not isinstance(payload, dict) or payload.get('format') != FILE_FORMAT:
        raise ValueError(f'{path!r} is not a bpt_mm whitening file (no '
                         f"format={FILE_FORMAT!r}); write one with "
                         'tools/compute_whitening.py')
    version = _typed_field(path, 'version', payload.get('version'), int)
    if version > FILE_VERSION:
        raise ValueError(f'{path!r} has format version {version}; this '
                         f'bpt_mm reads up to {FILE_VERSION}')
    for key, have in (('embed_dims', backbone.embed_dims),
                      ('num_layers', backbone.num_layers),
                      ('patch_size', backbone.patch_size)):
        stored_value = _typed_field(path, key, payload.get(key), int)
        if stored_value != have:
            raise _refuse(path, f'it is for {key}={stored_value}, the '
                          f'model has {key}={have}')
    stored = payload.get('blocks')
    if not isinstance(stored, dict):
        raise ValueError(f'{path!r} has no `blocks` dict')
    _check_header(path, payload, stored)
    needing = whitening_blocks(backbone)
    missing = [i for i in needing if i not in stored]
    if missing:
        raise _refuse(path, f'it has whitening for blocks {sorted(stored)} '
                      f'(layers {payload.get("layers")}), but the prompts of '
                      f'blocks {missing} need it')
    dim = backbone.embed_dims
    results = {}
    for block in needing:
        entry = stored[block]
        if not isinstance(entry, dict):
            raise ValueError(f'whitening file {path!r}: blocks[{block}] must '
                             f'be a dict, got {type(entry).__name__}')
        where = f'blocks[{block}]'
        unknown = sorted(set(entry) - set(_BLOCK_KEYS), key=str)
        if unknown:
            raise ValueError(f'whitening file {path!r}: `{where}` has '
                             f'unknown entries {_shown(unknown)}; a block '
                             f'holds only {sorted(_BLOCK_KEYS)}')
        matrix = _real_matrix(path, block, 'whitening',
                              entry.get('whitening'), dim)
        if not bool(torch.isfinite(matrix).all()):
            raise _refuse(path, f'block {block}: the whitening matrix has '
                          'non-finite values')
        _check_zca(path, block, matrix)
        sigma = entry.get('sigma')
        if sigma is not None:
            sigma = _real_matrix(path, block, 'sigma', sigma, dim)
        fingerprint = entry.get('qkv_fingerprint')
        if fingerprint is not None:
            fingerprint = float(_typed_field(
                path, f'{where}.qkv_fingerprint', fingerprint, (int, float)))
        if check_weights and fingerprint is not None:
            want, have = fingerprint, _fingerprint(backbone, block)
            if not math.isclose(want, have, rel_tol=_FINGERPRINT_RTOL):
                raise _refuse(
                    path, f'block {block}: it was computed with other '
                    f'attention weights (|qkv.weight| {want:.6g} in the '
                    f'file, {have:.6g} in the model); compute it again '
                    'after loading the pretrained weights')
        condition = float(_typed_field(
            path, f'{where}.condition_number',
            entry.get('condition_number', float('nan')), (int, float)))
        if 'condition_number' in entry and not (
                math.isfinite(condition) and condition >= 1):
            # max/min of positive eigenvalues: finite and at least 1.
            raise ValueError(f'whitening file {path!r}: `{where}.'
                             'condition_number` must be a finite number >= '
                             f'1, got {condition!r}')
        results[block] = {
            'whitening': matrix.to(torch.float32),
            'sigma': sigma,
            'num_tokens': _count_field(path, f'{where}.num_tokens',
                                       entry.get('num_tokens', 0)),
            'num_dropped_tokens': _count_field(
                path, f'{where}.num_dropped_tokens',
                entry.get('num_dropped_tokens', 0)),
            'num_images': _count_field(path, f'{where}.num_images',
                                       entry.get('num_images', 0)),
            'condition_number': condition,
        }
    if return_info:
        info = {k: v for k, v in payload.items() if k != 'blocks'}
        return results, info
    return results
