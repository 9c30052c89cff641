"""mmengine training state as plain data, so checkpoints load weights-only.

mmengine's ``Runner.save_checkpoint`` puts objects into a checkpoint that
``torch.load(weights_only=True)`` refuses: the message hub's
``HistoryBuffer`` objects (numpy arrays inside), numpy scalars (metrics,
seeds) and numpy arrays (the numpy generator state that
:class:`~bpt_mm.engine.checkpoint_hooks.RandomStateHook` stores).
:func:`to_plain` turns each into a small tagged dict of tensors and
numbers; :func:`from_plain` turns them back after a weights-only load.

A tagged dict is ``{TAG: kind, ...}`` with ``kind`` one of:

``'numpy'``
    a numpy array or scalar: ``value`` (a tensor of the same dtype and
    shape; numpy's non-native byte orders become native) and ``scalar``
    (bool: a numpy scalar rather than a 0-d array);
``'HistoryBuffer'``
    ``log`` and ``count`` (the ``numpy`` form of its two histories) and
    ``max_length`` (int).

Everything else a checkpoint may hold passes through as it is: tensors,
``None``, bool, int, float, complex, str, bytes, ``torch.Size``,
``torch.dtype``, ``torch.device`` and dict / OrderedDict / list / tuple /
set containers of those (other dict subclasses, such as mmengine's
``ConfigDict``, become dicts; numpy strings and other subclasses of
int/float/str/bytes their base type).
Anything else is refused at save time, naming where it is, so that a
checkpoint is never written that bpt_mm could not read back.

Decoding trusts nothing: a tagged dict from a file is checked field by
field, and numpy arrays are only ever made from tensors (no object arrays,
no dtype from the file).
"""
import collections
from typing import Any, Callable, Dict, Tuple

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

from ..safe_load import MAX_DEPTH, CheckpointError, describe_key

__all__ = ['TAG', 'to_plain', 'from_plain']

#: The key that marks a tagged dict.
TAG = '__bpt_mm_plain__'

_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.Size,
          torch.dtype, torch.device)
_BASE_TYPES = (int, float, complex, str, bytes)
# Tensor dtypes that have a numpy twin (what torch.from_numpy can make).
_NUMPY_DTYPES = frozenset(
    getattr(torch, name) for name in (
        'bool', 'uint8', 'int8', 'int16', 'int32', 'int64', 'uint16',
        'uint32', 'uint64', 'float16', 'float32', 'float64', 'complex64',
        'complex128') if hasattr(torch, name))


def _numpy_to_plain(value: Any, key: Tuple) -> Dict[str, Any]:
    array = np.asarray(value)
    if array.dtype.kind not in 'biufc' or array.dtype.fields is not None:
        raise TypeError(
            f'cannot store {describe_key(key)}: a numpy {array.dtype} '
            f'array; only bool and numeric arrays are written into '
            f'checkpoints')
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder('='))
    return {TAG: 'numpy', 'value': torch.from_numpy(array.copy()),
            'scalar': isinstance(value, np.generic)}


def _buffer_to_plain(buffer: HistoryBuffer, key: Tuple) -> Dict[str, Any]:
    log, count = buffer.data
    return {TAG: 'HistoryBuffer', 'max_length': int(buffer.max_length),
            'log': _numpy_to_plain(log, key + ('log', )),
            'count': _numpy_to_plain(count, key + ('count', ))}


def _walk(obj: Any, leaf: Callable[[Any, Tuple], Any],
          tagged: Callable[[dict, Tuple], Any]) -> Any:
    """Map leaves through ``leaf`` and tagged dicts through ``tagged``,
    bottom-up. A container none of whose items changed is returned as it
    is (a state dict keeps its ``_metadata``); a changed one is rebuilt as
    its plain type. Each container is visited once, so shared objects stay
    shared and a file cannot make the walk repeat."""
    done: Dict[int, Any] = {}

    def rebuilt(value: Any, key: Tuple) -> Any:
        if isinstance(value, dict):
            if TAG in value:
                return tagged(value, key)
            items = [(k, v, visit(v, key + (k, ))) for k, v in value.items()]
            if type(value) in (dict, collections.OrderedDict) and all(
                    new is old for _, old, new in items):
                return value
            ordered = isinstance(value, collections.OrderedDict)
            out = (collections.OrderedDict if ordered else dict)(
                (k, new) for k, _, new in items)
            if ordered:  # e.g. a state dict's _metadata
                vars(out).update(getattr(value, '__dict__', {}))
            return out
        old = list(value)
        new = [visit(v, key + (i, )) for i, v in enumerate(old)]
        if type(value) in (list, tuple, set, frozenset) and all(
                a is b for a, b in zip(old, new)):
            return value
        if isinstance(value, list):
            return new
        if isinstance(value, tuple):
            return tuple(new)
        return (frozenset if isinstance(value, frozenset) else set)(new)

    def visit(value: Any, key: Tuple) -> Any:
        if isinstance(value, torch.Tensor):
            return value
        if not isinstance(value, (dict, list, tuple, set, frozenset)):
            return leaf(value, key)
        if id(value) in done:
            return done[id(value)]
        if len(key) >= MAX_DEPTH:
            raise TypeError(f'{describe_key(key[:8])}...: containers nested '
                            f'deeper than {MAX_DEPTH} levels')
        out = done[id(value)] = rebuilt(value, key)
        return out

    return visit(obj, ())


def _encode_leaf(value: Any, key: Tuple) -> Any:
    if type(value) in _ATOMS:
        return value
    if isinstance(value, HistoryBuffer):
        return _buffer_to_plain(value, key)
    if isinstance(value, (np.str_, np.bytes_)):  # text, not numbers
        return str(value) if isinstance(value, str) else bytes(value)
    if isinstance(value, (np.generic, np.ndarray)):
        return _numpy_to_plain(value, key)
    for base in _BASE_TYPES:
        if isinstance(value, base) and not isinstance(value, bool):
            return base(value)
    raise TypeError(
        f'cannot store {describe_key(key)}: a {type(value).__module__}.'
        f'{type(value).__qualname__}, which torch.load(weights_only=True) '
        f'cannot read back; bpt_mm writes only checkpoints that load '
        f'without running code. Store tensors, numbers, strings or '
        f'containers of them instead.')


def _refuse_tag(value: dict, key: Tuple) -> Any:
    raise TypeError(f'cannot store {describe_key(key)}: a dict whose key '
                    f'{TAG!r} is reserved for bpt_mm\'s plain form')


def to_plain(checkpoint: Any) -> Any:
    """The checkpoint with every HistoryBuffer and numpy value replaced by
    its tagged dict; the input is not modified (containers are copied,
    tensors shared).

    Args:
        checkpoint: What mmengine's ``Runner.save_checkpoint`` built (or any
            nest of containers).

    Returns:
        An object that ``torch.save`` writes and
        ``torch.load(weights_only=True)`` reads.

    Raises:
        TypeError: A value of another type, naming where it is.

    Examples:
        >>> from mmengine.logging import HistoryBuffer
        >>> plain = to_plain({'loss': HistoryBuffer([0.5, 0.25], [1, 1])})
        >>> float(from_plain(plain)['loss'].mean())
        0.375
    """
    return _walk(checkpoint, _encode_leaf, _refuse_tag)


def _tensor_to_numpy(value: Any, key: Tuple) -> np.ndarray:
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided \
            or value.dtype not in _NUMPY_DTYPES:
        raise TypeError(f'{describe_key(key)} must be a dense tensor of a '
                        f'numpy dtype, got {_describe(value)}')
    return value.detach().cpu().numpy().copy()


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f'a {value.dtype} {value.layout} tensor'
    return f'a {type(value).__name__}'


def _decode_tagged(value: dict, key: Tuple) -> Any:
    kind = value.get(TAG)
    if kind == 'numpy':
        if set(value) != {TAG, 'value', 'scalar'} or \
                not isinstance(value['scalar'], bool):
            raise TypeError(f'{describe_key(key)}: a numpy entry must have '
                            f'exactly `value` (tensor) and `scalar` (bool), '
                            f'got keys {sorted(map(str, value))}')
        array = _tensor_to_numpy(value['value'], key + ('value', ))
        if value['scalar']:
            if array.ndim != 0:
                raise TypeError(f'{describe_key(key)}: a numpy scalar must '
                                f'be a 0-d tensor, got shape {array.shape}')
            return array[()]
        return array
    if kind == 'HistoryBuffer':
        if set(value) != {TAG, 'log', 'count', 'max_length'}:
            raise TypeError(f'{describe_key(key)}: a HistoryBuffer entry '
                            f'must have exactly `log`, `count` and '
                            f'`max_length`, got keys '
                            f'{sorted(map(str, value))}')
        max_length = value['max_length']
        histories = [_decode_tagged(value[name], key + (name, ))
                     if isinstance(value[name], dict) else value[name]
                     for name in ('log', 'count')]
        if type(max_length) is not int or max_length < 1:
            raise TypeError(f'{describe_key(key)}: `max_length` must be a '
                            f'positive int, got {max_length!r}')
        for name, array in zip(('log', 'count'), histories):
            if not isinstance(array, np.ndarray) or array.ndim != 1:
                raise TypeError(f'{describe_key(key + (name, ))} must be a '
                                f'1-d numpy entry, got {_describe(array)}')
        if len(histories[0]) != len(histories[1]) or \
                len(histories[0]) > max_length:
            raise TypeError(f'{describe_key(key)}: `log` and `count` must '
                            f'have the same length, at most max_length='
                            f'{max_length}; got {len(histories[0])} and '
                            f'{len(histories[1])}')
        return HistoryBuffer(histories[0], histories[1], max_length)
    raise TypeError(f'{describe_key(key)}: unknown {TAG} kind {kind!r}; '
                    f'known: numpy, HistoryBuffer')


def from_plain(checkpoint: Any, path: str = '<memory>') -> Any:
    """Undo :func:`to_plain` on what a weights-only load returned.

    Args:
        checkpoint: The loaded object.
        path (str): The file it came from, for messages.

    Returns:
        The object with HistoryBuffers and numpy values restored.

    Raises:
        CheckpointError: A malformed tagged dict, naming the file and key.
    """
    try:
        return _walk(checkpoint, lambda value, key: value, _decode_tagged)
    except TypeError as exc:
        raise CheckpointError(f'refusing checkpoint {path!r}: {exc}') \
            from exc
