"""The typed ``prompt=dict(...)`` of :class:`~bpt_mm.models.PromptedViT`.

:class:`PromptConfig` is built once from the config dict: it owns the shared
keys (``type``, ``num_tokens``, ``depth``, ``layers``,
``trainable_projection_layers``, ``dropout``, ``allow_identity_whitening``)
with their defaults and the depth/layers rules, and holds the prompt type's
own options (:class:`~bpt_mm.models.prompts.PromptOptions`, which check
``rank``, ``tunable``, ``whitening_init``, ``init_std``, ``init``,
``source``). Every error names ``prompt.<key>``. The backbone, the launch
preflight and the whitening collector ask it (or the prompt modules built
from it) what a prompt needs instead of matching type names.
"""
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple, Type

from bpt_mm.choices import did_you_mean

from .prompts import (BasePrompt, PromptOptions, WhitenedOptions,
                      check_positive_int, option_keys, prompt_class,
                      prompt_options)

#: Keys of ``prompt=dict(...)`` shared by every prompt type.
PROMPT_KEYS = ('type', 'num_tokens', 'depth', 'layers',
               'trainable_projection_layers', 'dropout',
               'allow_identity_whitening')

#: How many of the top prompted blocks train their projection by default,
#: as in the authors' deep BPT.
DEFAULT_TRAINABLE_PROJECTION_BLOCKS = 4


def normalise_indices(indices: Any, num_layers: int,
                      key: str) -> Tuple[int, ...]:
    """Turn ints or sequences of ints (negative allowed) into sorted
    indices.

    Args:
        indices: An int or a non-empty list/tuple of ints.
        num_layers (int): Blocks of the model.
        key (str): The config key, for errors.

    Returns:
        tuple[int]: Sorted block indices in ``[0, num_layers)``.
    """
    if isinstance(indices, int) and not isinstance(indices, bool):
        indices = (indices, )
    if not isinstance(indices, (list, tuple)) or not indices:
        raise ValueError(f'`{key}` must be an int or a non-empty list/tuple '
                         f'of ints in [-{num_layers}, {num_layers - 1}], got '
                         f'{indices!r}')
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) \
                or not -num_layers <= i < num_layers:
            raise ValueError(f'`{key}` entries must be ints in '
                             f'[-{num_layers}, {num_layers - 1}] (the model '
                             f'has {num_layers} blocks), got {i!r}')
        out.append(i % num_layers)
    if len(set(out)) != len(out):
        raise ValueError(f'`{key}` has duplicated blocks: {indices!r}')
    return tuple(sorted(out))


@dataclass(frozen=True)
class PromptConfig:
    """A validated ``prompt=dict(...)`` with its defaults filled.

    Build it with :meth:`from_dict`; see :class:`~bpt_mm.models.PromptedViT`
    for what each key means.

    Examples:
        >>> cfg = PromptConfig.from_dict(
        ...     dict(type='WhitenedPrompt', num_tokens=10, depth='deep'),
        ...     num_layers=6)
        >>> cfg.layers, cfg.trainable_projection_layers, cfg.needs_whitening
        ((0, 1, 2, 3, 4, 5), (), True)
    """

    type: str
    num_tokens: int
    options: PromptOptions
    depth: str = 'shallow'
    layers: Tuple[int, ...] = (0, )
    trainable_projection_layers: Tuple[int, ...] = (0, )
    dropout: float = 0.
    allow_identity_whitening: bool = False

    @property
    def prompt_class(self) -> Type[BasePrompt]:
        """The registered prompt class."""
        return prompt_class(self.type)

    @property
    def needs_whitening(self) -> bool:
        """Whether the prompts need data-driven whitening."""
        return self.options.needs_whitening

    @property
    def needs_prototypes(self) -> bool:
        """Whether the prompts start as prototypes of data tokens (SPT)."""
        return self.options.needs_prototypes

    @property
    def needs_data_pass(self) -> bool:
        """Whether training needs a data pass before the first step (and
        ``allow_identity_whitening`` does not waive it)."""
        return self.options.needs_data_pass and \
            not self.allow_identity_whitening

    @property
    def has_trainable_projection(self) -> bool:
        """Whether the type's projection (``W`` or ``B``) can train."""
        return self.options.has_trainable_projection

    def as_dict(self) -> Dict[str, Any]:
        """The flat dict form (shared keys and type options), as the
        backbone's ``prompt_cfg``."""
        out = {'type': self.type, 'num_tokens': self.num_tokens,
               'depth': self.depth, 'dropout': self.dropout,
               'allow_identity_whitening': self.allow_identity_whitening}
        out.update({k: getattr(self.options, k)
                    for k in option_keys(self.prompt_class)[0]})
        out['layers'] = self.layers
        out['trainable_projection_layers'] = self.trainable_projection_layers
        return out

    @classmethod
    def from_dict(cls, prompt: Mapping[str, Any],
                  num_layers: int) -> 'PromptConfig':
        """Validate ``prompt`` once; every error names ``prompt.<key>``.

        Args:
            prompt (Mapping): The ``prompt=dict(...)`` of the backbone.
            num_layers (int): Blocks of the ViT (for ``layers``).

        Returns:
            PromptConfig: The validated config.
        """
        if not isinstance(prompt, Mapping):
            raise TypeError(f'`prompt` must be None or a dict, got '
                            f'{type(prompt).__name__}')
        cfg = dict(prompt)
        kind = prompt_class(cfg.get('type'))
        type_name = kind.__name__
        type_keys = option_keys(kind)[0]
        allowed = set(PROMPT_KEYS) | type_keys
        for key in cfg:
            if key not in allowed:
                raise ValueError(
                    f'unknown key `prompt.{key}` for {type_name}'
                    f'{did_you_mean(key, sorted(allowed))}; allowed keys: '
                    f'{sorted(allowed)}')
        type_cfg = {k: v for k, v in cfg.items() if k in type_keys}
        for key in sorted(option_keys(kind)[1] - set(type_cfg)):
            raise ValueError(f'`prompt.{key}` is required for {type_name}')
        if 'num_tokens' not in cfg:
            raise ValueError('`prompt.num_tokens` is required (the number of '
                             'prompt tokens m)')
        num_tokens = check_positive_int(cfg['num_tokens'], 'prompt.num_tokens')
        depth = cfg.get('depth', 'shallow')
        if depth not in ('shallow', 'deep'):
            raise ValueError(f"`prompt.depth` must be 'shallow' or 'deep', "
                             f'got {depth!r}'
                             f"{did_you_mean(depth, ('shallow', 'deep'))}")
        dropout = cfg.get('dropout', 0.)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0 <= dropout < 1:
            raise ValueError(f'`prompt.dropout` must be a float in [0, 1), '
                             f'got {dropout!r}')
        allow_identity = cfg.get('allow_identity_whitening', False)
        if not isinstance(allow_identity, bool):
            raise TypeError(f'`prompt.allow_identity_whitening` must be a '
                            f'bool, got {allow_identity!r}')
        # The rules on sizes (`prompt.rank` against m and d) are checked by
        # the prompt class where the prompt is built, which knows d.
        options = prompt_options(kind, type_cfg)
        layers, trainable = cls._blocks(cfg, depth, options, type_name,
                                        num_layers)
        return cls(type=type_name, num_tokens=num_tokens, options=options,
                   depth=depth, layers=layers,
                   trainable_projection_layers=trainable, dropout=dropout,
                   allow_identity_whitening=allow_identity)

    @staticmethod
    def _blocks(cfg: Dict[str, Any], depth: str, options: PromptOptions,
                type_name: str, num_layers: int
                ) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """The depth/layers rules: prompted blocks, and those whose
        projection trains."""
        if depth == 'shallow':
            for key in ('layers', 'trainable_projection_layers'):
                if cfg.get(key) is not None:
                    raise ValueError(
                        f"`prompt.{key}` is only for depth='deep'; shallow "
                        f'prompts enter once before block 0')
            return (0, ), (0, )
        layers = cfg.get('layers')
        layers = (tuple(range(num_layers)) if layers is None else
                  normalise_indices(layers, num_layers, 'prompt.layers'))
        tpl = cfg.get('trainable_projection_layers')
        if tpl is None:
            return layers, (layers[-DEFAULT_TRAINABLE_PROJECTION_BLOCKS:]
                            if options.has_trainable_projection else ())
        if not options.has_trainable_projection:
            raise ValueError(
                f'`prompt.trainable_projection_layers` needs a prompt '
                f'with a trainable projection (BilinearPrompt or '
                f'WhitenedPrompt with tunable=True), got {type_name} '
                + ('(tunable=False)' if isinstance(options, WhitenedOptions)
                   else ''))
        tpl = () if tpl == () or tpl == [] else normalise_indices(
            tpl, num_layers, 'prompt.trainable_projection_layers')
        outside = sorted(set(tpl) - set(layers))
        if outside:
            raise ValueError(
                f'`prompt.trainable_projection_layers` {outside} are not '
                f'prompted blocks; `prompt.layers` is {layers}')
        return layers, tuple(tpl)


def prompt_type_options(prompt: Mapping[str, Any]) -> PromptOptions:
    """Validate ``prompt.type`` and its type's options, nothing else.

    For checks made before the model (and so the number of blocks) exists,
    such as the launch preflight; errors name ``prompt.<key>``, as
    :meth:`PromptConfig.from_dict` does, which also checks the shared keys.

    Args:
        prompt (Mapping): The ``prompt=dict(...)`` of the backbone.

    Returns:
        PromptOptions: The type's validated options.
    """
    kind = prompt_class(prompt.get('type'))
    type_keys = option_keys(kind)[0]
    return prompt_options(
        kind, {k: v for k, v in prompt.items() if k in type_keys})
