"""The rule for a misspelt name: a key or an option value not among the
allowed ones is refused with the allowed ones and the closest of them
("did you mean 'x'?"), for config keys, hook options and option values
alike."""
import difflib
from typing import Any, Sequence, TypeVar

__all__ = ['did_you_mean', 'check_choice']

Choice = TypeVar('Choice')


def did_you_mean(name: Any, allowed: Sequence[Any]) -> str:
    """A `` (did you mean 'x'?)`` hint for a misspelt ``name``, or ''.

    Args:
        name (Any): The key or value given; only a string gets a hint.
        allowed (Sequence): The allowed keys or values (the strings among
            them are compared).

    Returns:
        str: The hint, with its leading space, or ''.
    """
    if not isinstance(name, str):
        return ''
    close = difflib.get_close_matches(
        name, [a for a in allowed if isinstance(a, str)], n=1)
    return f' (did you mean {close[0]!r}?)' if close else ''


def check_choice(value: Choice, allowed: Sequence[Choice],
                 arg: str) -> Choice:
    """``value`` if it is one of ``allowed``, else a ValueError naming
    ``arg``, the allowed values and the closest of them.

    Args:
        value (Any): The value given.
        allowed (Sequence): The allowed values.
        arg (str): The option's name, for the message
            (e.g. ``'prompt.init'``).

    Returns:
        The value.
    """
    if value not in allowed:
        raise ValueError(f'`{arg}` must be one of {allowed}, got {value!r}'
                         f'{did_you_mean(value, allowed)}')
    return value
