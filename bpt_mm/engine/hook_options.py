"""The rule for a hook option a config names but the hook does not have.

mmengine builds a hook from its ``custom_hooks`` entry as ``Hook(**entry)``,
so a misspelt key would reach Python's own message, which names the key but
neither the options nor the one meant.
"""
import inspect
from typing import Any, Callable, Dict

from bpt_mm.choices import did_you_mean


def refuse_unknown_options(owner: str, init: Callable[..., Any],
                           unknown: Dict[str, Any]) -> None:
    """Raise a TypeError naming ``unknown`` keys, the closest allowed one
    and every allowed option of ``init``; nothing when ``unknown`` is
    empty.

    Args:
        owner (str): The hook's name, e.g. ``'PromptStatsHook'``.
        init (callable): Its ``__init__``, whose parameters (but ``self``
            and a ``**`` catch-all) are the allowed options.
        unknown (dict): The options given that ``init`` does not have.
    """
    if not unknown:
        return
    allowed = [name for name, param in inspect.signature(
        init).parameters.items() if name != 'self'
        and param.kind != inspect.Parameter.VAR_KEYWORD]
    key = sorted(unknown)[0]
    raise TypeError(f'{owner} got unknown option(s) {sorted(unknown)}'
                    f'{did_you_mean(key, allowed)};'
                    f' allowed options: {allowed}')
