"""Prompt parameterisations of BPT, one small module each.

Every class owns the parameters of the prompts of *one* prompted block and
returns the effective prompt ``P~`` of shape ``(num_tokens, embed_dims)`` from
``forward()``. Where the prompts go (shallow or deep) is decided by
:class:`bpt_mm.models.PromptedViT`, not here.

=================  ==========================  ===============================
class              trainable                   effective prompt
=================  ==========================  ===============================
VPTPrompt          P (m x d)                   P
SPTPrompt          P (m x d), from data        P  (SPT: P starts as prototypes)
WhitenedPrompt     P; W (d x d) if tunable     P @ W.T  (BPT-fWhiten/tWhiten)
BilinearPrompt     A (m x p), B (d x p)        A @ B.T  (BPT-bilinear)
=================  ==========================  ===============================

A projection (``W`` or ``B``) that is not trained is a *buffer*, so it never
reaches an optimizer or DDP, yet it keeps the same state-dict key as when it is
a parameter: checkpoints load whichever way a config sets trainability.

Whitening matrices start as the identity and are filled from data before
training (see :mod:`bpt_mm.whitening.linalg` and ``BPTWhiteningHook``). The
persistent buffer ``whitening_ready`` records that this happened, so a
resumed run or a loaded checkpoint does not compute them again.
"""
import math
import warnings
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Type

import torch
import torch.nn as nn

from bpt_mm.choices import check_choice, did_you_mean
from bpt_mm.registry import PROMPTS


def check_positive_int(value, key: str) -> int:
    """Return ``value`` if it is a positive int, else raise naming ``key``.

    ``bool`` is refused although it is an int subclass: ``num_tokens=True``
    is a typo, not 1; a string such as ``'100'`` is a TypeError.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'`{key}` must be a positive int, got {value!r} '
                        f'({type(value).__name__})')
    if value <= 0:
        raise ValueError(f'`{key}` must be a positive int, got {value}')
    return value


def check_init_std(value, key: str = 'prompt.init_std') -> float:
    """Return ``value`` if it is a finite float >= 0, else raise naming
    ``key`` (torch's own error would name neither the key nor the prompt)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f'`{key}` must be a float >= 0, got {value!r} '
                        f'({type(value).__name__})')
    if not 0 <= value < math.inf:
        raise ValueError(f'`{key}` must be a finite float >= 0, got {value}')
    return float(value)


# ---------------------------------------------------------------------------
# Options: the type-specific keys of ``prompt=dict(...)``, checked once
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptOptions:
    """Validated type-specific options of a prompt type (none for VPT).

    Each prompt class names its options class in :attr:`BasePrompt.Options`;
    the options own their defaults and checks (errors name ``prompt.<key>``)
    and answer what the rest of the package asks of a prompt type before any
    module exists (the launch preflight, :class:`PromptConfig`).
    """

    #: Whether the prompt needs data-driven whitening before training.
    needs_whitening: ClassVar[bool] = False
    #: Whether the prompt is initialised from prototypes of data tokens.
    needs_prototypes: ClassVar[bool] = False

    @property
    def has_trainable_projection(self) -> bool:
        """Whether a projection (``W`` or ``B``) can train at all."""
        return False

    @property
    def needs_data_pass(self) -> bool:
        """Whether anything must be computed from data before training."""
        return self.needs_whitening or self.needs_prototypes

    def check_sizes(self, num_tokens: int, embed_dims: int) -> None:
        """Check the options that depend on ``m`` and ``d``.

        Args:
            num_tokens (int): ``m``.
            embed_dims (int): ``d``.
        """


#: How SPT prototypes are made from the tokens (see
#: :mod:`bpt_mm.whitening.prototypes`).
PROTOTYPE_INITS = ('sample', 'kmeans', 'mean_pool', 'max_pool')
#: Which tokens of a prompted block they are made of: the patch embedding
#: before the position embedding is added (``'patch_embed'``, the authors'
#: shallow SPT), or the patch tokens entering the block (``'block_input'``,
#: the authors' deep SPT).
PROTOTYPE_SOURCES = ('patch_embed', 'block_input')


@dataclass(frozen=True)
class SPTOptions(PromptOptions):
    """Options of :class:`SPTPrompt`: ``init`` (one of
    :data:`PROTOTYPE_INITS`) and ``source`` (None: by depth, or one of
    :data:`PROTOTYPE_SOURCES`)."""

    init: str = 'sample'
    source: Optional[str] = None
    needs_prototypes: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_choice(self.init, PROTOTYPE_INITS, 'prompt.init')
        if self.source is not None \
                and self.source not in PROTOTYPE_SOURCES:
            raise ValueError(f'`prompt.source` must be None (by depth) or '
                             f'one of {PROTOTYPE_SOURCES}, got '
                             f'{self.source!r}'
                             f'{did_you_mean(self.source, PROTOTYPE_SOURCES)}')


@dataclass(frozen=True)
class WhitenedOptions(PromptOptions):
    """Options of :class:`WhitenedPrompt`: ``tunable`` and ``init_std``."""

    tunable: bool = False
    init_std: float = 0.02
    needs_whitening: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.tunable, bool):
            raise TypeError(f'WhitenedPrompt `tunable` (prompt.tunable) must '
                            f'be True (tWhiten) or False (fWhiten), got '
                            f'{self.tunable!r}')
        check_init_std(self.init_std)

    @property
    def has_trainable_projection(self) -> bool:
        # fWhiten: W never trains.
        return self.tunable


@dataclass(frozen=True)
class BilinearOptions(PromptOptions):
    """Options of :class:`BilinearPrompt`: ``rank`` (required),
    ``whitening_init`` and ``init_std``."""

    rank: int
    whitening_init: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.whitening_init, bool):
            raise TypeError(f'BilinearPrompt `whitening_init` '
                            f'(prompt.whitening_init) must be a bool, got '
                            f'{self.whitening_init!r}')
        check_positive_int(self.rank, 'prompt.rank')
        check_init_std(self.init_std)

    @property
    def needs_whitening(self) -> bool:  # type: ignore[override]
        # Only a whitening-initialised basis needs the data-driven step.
        return self.whitening_init

    @property
    def has_trainable_projection(self) -> bool:
        return True

    def check_sizes(self, num_tokens: int, embed_dims: int) -> None:
        check_rank(self.rank, num_tokens, embed_dims, self.whitening_init)


class BasePrompt(nn.Module):
    """Interface of a prompt parameterisation for one block.

    Args:
        num_tokens (int): Number of prompt tokens ``m``.
        embed_dims (int): Token width ``d`` of the ViT.
        trainable_projection (bool): Whether the projection (``W`` or ``B``)
            of this block trains. Ignored by classes without a projection,
            which say so through :attr:`has_trainable_projection`.
        options (PromptOptions, optional): The type's validated options
            (an instance of :attr:`Options`); None takes its defaults.
    """

    #: The options class of this prompt type (its own config keys).
    Options: ClassVar[Type[PromptOptions]] = PromptOptions
    #: Name of the projection tensor (``W`` or ``B``) whitening writes.
    projection_name: Optional[str] = None
    #: Columns ``p`` of a basis ``B = W C`` that whitening builds for this
    #: prompt; None where whitening writes ``W`` itself.
    basis_rank: Optional[int] = None

    def __init__(self, num_tokens: int, embed_dims: int,
                 trainable_projection: bool = True,
                 options: Optional[PromptOptions] = None) -> None:
        super().__init__()
        self.num_tokens = check_positive_int(num_tokens, 'prompt.num_tokens')
        self.embed_dims = check_positive_int(embed_dims, 'embed_dims')
        self.options = self.Options() if options is None else options
        self.trainable_projection = bool(trainable_projection)
        if self.needs_whitening:
            self.register_buffer('whitening_ready',
                                 torch.zeros((), dtype=torch.bool))

    @property
    def needs_whitening(self) -> bool:
        """Whether ``forward`` is only meaningful after data-driven
        whitening."""
        return self.options.needs_whitening

    @property
    def needs_prototypes(self) -> bool:
        """Whether the prompt is initialised from prototypes of data
        tokens (SPT)."""
        return self.options.needs_prototypes

    @property
    def has_trainable_projection(self) -> bool:
        """Whether this block's projection (``W`` or ``B``) trains."""
        return self.options.has_trainable_projection and \
            self.trainable_projection

    def apply_whitening(self, result: Mapping[str, torch.Tensor]) -> None:
        """Write one block's whitening result (``'whitening'``, and
        ``'basis'`` for a basis prompt) into this prompt, in its dtype and
        device.

        Args:
            result (Mapping[str, Tensor]): The block's whitening result.
        """
        raise TypeError(f'{type(self).__name__} has neither set_whitening '
                        'nor set_basis; cannot write whitening into it')

    def _projection(self, name: str, value: torch.Tensor) -> None:
        """Register ``value`` as a parameter if it trains, else a buffer."""
        if self.trainable_projection:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    @property
    def is_whitened(self) -> bool:
        """True once whitening statistics were written into this prompt."""
        return (not self.needs_whitening) or bool(self.whitening_ready)

    #: Set on load: the projection came from a state dict that does not mark
    #: it whitened (trained without whitening, e.g. with
    #: ``allow_identity_whitening=True``), so whitening must not overwrite it.
    projection_loaded_unwhitened: bool = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata,
                              strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # Keep `whitening_ready` true to what was really loaded: a projection
        # of another shape is skipped by a non-strict load (mmengine's
        # load_from and --resume), and its `whitening_ready=True` must not
        # mark the random projection left in its place as whitened.
        name = self.projection_name
        if not (self.needs_whitening and name):
            super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                          strict, missing_keys,
                                          unexpected_keys, error_msgs)
            return
        own = getattr(self, name)
        incoming = state_dict.get(prefix + name)
        fits = isinstance(incoming, torch.Tensor) and \
            incoming.shape == own.shape
        ready_before = self.whitening_ready.clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not fits:
            self.whitening_ready.copy_(ready_before)
            return
        at_initial_value = name == 'whitening' and torch.equal(
            incoming.to(own.dtype),
            torch.eye(own.shape[0], dtype=own.dtype, device=incoming.device))
        self.projection_loaded_unwhitened = \
            not bool(self.whitening_ready) and not at_initial_value

    def forward(self) -> torch.Tensor:
        raise NotImplementedError


@PROMPTS.register_module()
class VPTPrompt(BasePrompt):
    """Plain visual prompts (VPT): ``P~ = P``.

    ``P`` is initialised uniformly in ``±sqrt(6 / (3 * patch_size**2 + d))``
    as in VPT's code (Xavier for a patch-sized fan-in), ``±0.0625`` for
    ViT-B/16.

    Args:
        num_tokens (int): Number of prompts ``m``.
        embed_dims (int): Token width ``d``.
        patch_size (int): Patch size of the ViT, used by the initialisation.

    Examples:
        >>> p = VPTPrompt(num_tokens=10, embed_dims=768)
        >>> p().shape
        torch.Size([10, 768])
    """

    def __init__(self, num_tokens: int, embed_dims: int,
                 patch_size: int = 16, **kwargs) -> None:
        super().__init__(num_tokens, embed_dims, **kwargs)
        bound = math.sqrt(6.0 / (3 * patch_size * patch_size + embed_dims))
        self.tokens = nn.Parameter(
            torch.empty(num_tokens, embed_dims).uniform_(-bound, bound))

    def forward(self) -> torch.Tensor:
        return self.tokens


@PROMPTS.register_module()
class SPTPrompt(VPTPrompt):
    """SPT (self-prompt tuning): VPT prompts initialised from prototypes of
    the training data's own tokens, ``P~ = P``.

    ``P`` starts as VPT's uniform initialisation and is overwritten before
    training by ``BPTWhiteningHook``, in the same data pass that computes
    whitening (see :func:`bpt_mm.whitening.collect.collect_prototypes` and
    :mod:`bpt_mm.whitening.prototypes`). The persistent buffer
    ``prototypes_ready`` records that this happened, so a resumed run or a
    loaded checkpoint does
    not compute them again, and :class:`~bpt_mm.models.PromptedViT` refuses
    to train prompts that never got them (unless
    ``allow_identity_whitening=True``, which trains from the uniform start).
    The trainable count is VPT's: ``m * d`` per prompted block.

    Args:
        num_tokens (int): Number of prompts ``m``.
        embed_dims (int): Token width ``d``.
        patch_size (int): Patch size of the ViT (VPT's initialisation).
        init (str): How the prototypes are made from the tokens:
            ``'sample'`` (default, the authors' ``random``), ``'kmeans'``,
            ``'mean_pool'`` or ``'max_pool'``.
        source (str, optional): The tokens: ``'patch_embed'`` (the patch
            embedding before the position embedding) or ``'block_input'``
            (the patch tokens entering the prompted block). None (default)
            follows the authors: ``'patch_embed'`` for shallow prompts,
            ``'block_input'`` for deep ones.

    Examples:
        >>> p = SPTPrompt(num_tokens=100, embed_dims=768, init='kmeans')
        >>> sum(t.numel() for t in p.parameters()), bool(p.prototypes_ready)
        (76800, False)
    """

    Options = SPTOptions

    def __init__(self, num_tokens: int, embed_dims: int,
                 patch_size: int = 16, init: str = 'sample',
                 source: Optional[str] = None, **kwargs) -> None:
        options = SPTOptions(init=init, source=source)
        super().__init__(num_tokens, embed_dims, patch_size=patch_size,
                         options=options, **kwargs)
        self.init = options.init
        self.source = options.source
        self.register_buffer('prototypes_ready',
                             torch.zeros((), dtype=torch.bool))

    @property
    def is_whitened(self) -> bool:
        # PromptedViT asks every prompt through this one property whether
        # its data-driven initialisation is in place; here that is the
        # prototypes.
        return bool(self.prototypes_ready)

    @torch.no_grad()
    def set_prototypes(self, prototypes: torch.Tensor) -> None:
        """Write the (m x d) prototypes into ``P`` and mark them done."""
        if prototypes.shape != self.tokens.shape:
            raise ValueError(f'SPT prototypes must have shape '
                             f'{tuple(self.tokens.shape)}, got '
                             f'{tuple(prototypes.shape)}')
        self.tokens.copy_(prototypes)
        self.prototypes_ready.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata,
                              strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # As the whitened prompts do for their projection: `prototypes_ready`
        # stays true to what was really loaded, and prompt tokens loaded
        # without it (a VPT checkpoint, or SPT trained from the uniform
        # start) are marked, so that prototypes never overwrite them.
        incoming = state_dict.get(prefix + 'tokens')
        fits = isinstance(incoming, torch.Tensor) and \
            incoming.shape == self.tokens.shape
        ready_before = self.prototypes_ready.clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not fits:
            self.prototypes_ready.copy_(ready_before)
            return
        self.tokens_loaded_without_prototypes = \
            not bool(self.prototypes_ready)

    #: Set on load: the prompt tokens came from a state dict that does not
    #: mark them as prototypes (see ``_load_from_state_dict``).
    tokens_loaded_without_prototypes: bool = False


@PROMPTS.register_module()
class WhitenedPrompt(BasePrompt):
    """BPT-fWhiten / BPT-tWhiten: ``P~ = P @ W.T``.

    ``W`` is the ZCA whitening matrix of the block's query-key-projected
    patch tokens. It starts as the identity and is filled from data before
    training. With ``tunable=False`` (fWhiten) it is a buffer; with
    ``tunable=True`` (tWhiten) it is a parameter initialised by the ZCA
    matrix, unless this block's projection is frozen (deep prompts train it
    only in some blocks).

    Args:
        num_tokens (int): Number of prompts ``m``.
        embed_dims (int): Token width ``d``.
        tunable (bool): Train ``W`` (tWhiten) or keep it fixed (fWhiten).
        trainable_projection (bool): Whether this block's ``W`` trains when
            ``tunable``. Set by the backbone.
        init_std (float): Std of the normal initialisation of ``P``.

    Examples:
        >>> p = WhitenedPrompt(num_tokens=100, embed_dims=768, tunable=True)
        >>> sum(t.numel() for t in p.parameters())
        666624
    """

    Options = WhitenedOptions
    projection_name = 'whitening'

    def __init__(self, num_tokens: int, embed_dims: int,
                 tunable: bool = False, trainable_projection: bool = True,
                 init_std: float = 0.02, **kwargs) -> None:
        options = WhitenedOptions(tunable=tunable, init_std=init_std)
        kwargs.pop('patch_size', None)
        super().__init__(num_tokens, embed_dims,
                         trainable_projection=tunable and trainable_projection,
                         options=options, **kwargs)
        self.tunable = tunable
        self.tokens = nn.Parameter(
            torch.empty(num_tokens, embed_dims).normal_(0, init_std))
        self._projection('whitening', torch.eye(embed_dims))

    @torch.no_grad()
    def set_whitening(self, whitening: torch.Tensor) -> None:
        """Write a (d x d) whitening matrix and mark the prompt as whitened."""
        if whitening.shape != self.whitening.shape:
            raise ValueError(
                f'whitening matrix must have shape '
                f'{tuple(self.whitening.shape)}, got '
                f'{tuple(whitening.shape)}')
        self.whitening.copy_(whitening)
        self.whitening_ready.fill_(True)
        self.projection_loaded_unwhitened = False

    def apply_whitening(self, result: Mapping[str, torch.Tensor]) -> None:
        self.set_whitening(result['whitening'].to(
            device=self.whitening.device, dtype=self.whitening.dtype))

    def forward(self) -> torch.Tensor:
        return self.tokens @ self.whitening.t()


@PROMPTS.register_module()
class BilinearPrompt(BasePrompt):
    """BPT-bilinear: ``P~ = A @ B.T`` with ``A`` (m x p) and ``B`` (d x p).

    The rank ``p`` sets the parameter count ``m * p + d * p``. ``A`` is drawn
    from ``N(0, init_std**2)`` and ``B`` is Xavier-uniform, as in the authors'
    code. With ``whitening_init=True``, ``B`` is instead set from data before
    training to ``W @ C`` (``W`` the ZCA matrix, ``C`` orthonormal columns;
    see :func:`bpt_mm.whitening.linalg.whitened_bilinear_basis`), the
    default of the authors' MAE models.

    Args:
        num_tokens (int): Number of prompts ``m``.
        embed_dims (int): Token width ``d``.
        rank (int): Inner dimension ``p``. Above ``d`` with
            ``whitening_init`` it is refused (``B = W C`` has at most ``d``
            orthonormal columns ``C``); otherwise, above ``min(m, d)`` it
            adds parameters without adding rank (a warning says so). See
            :func:`check_rank`.
        trainable_projection (bool): Whether ``B`` trains. Set by the
            backbone.
        whitening_init (bool): Initialise ``B`` by whitening.
        init_std (float): Std of the normal initialisation of ``A``.

    Examples:
        >>> p = BilinearPrompt(num_tokens=100, embed_dims=768, rank=75)
        >>> sum(t.numel() for t in p.parameters())
        65100
    """

    Options = BilinearOptions
    projection_name = 'basis'

    def __init__(self, num_tokens: int, embed_dims: int, rank: int,
                 trainable_projection: bool = True,
                 whitening_init: bool = False, init_std: float = 0.02,
                 **kwargs) -> None:
        options = BilinearOptions(rank=rank, whitening_init=whitening_init,
                                  init_std=init_std)
        kwargs.pop('patch_size', None)
        super().__init__(num_tokens, embed_dims,
                         trainable_projection=trainable_projection,
                         options=options, **kwargs)
        options.check_sizes(self.num_tokens, self.embed_dims)
        self.rank = self.basis_rank = rank
        self.whitening_init = whitening_init
        self.coefficients = nn.Parameter(
            torch.empty(num_tokens, rank).normal_(0, init_std))
        basis = torch.empty(embed_dims, rank)
        nn.init.xavier_uniform_(basis)
        self._projection('basis', basis)

    @torch.no_grad()
    def set_basis(self, basis: torch.Tensor) -> None:
        """Write ``B`` (d x p), e.g. a whitened basis, and mark it done."""
        if basis.shape != self.basis.shape:
            raise ValueError(f'bilinear basis must have shape '
                             f'{tuple(self.basis.shape)}, got '
                             f'{tuple(basis.shape)}')
        self.basis.copy_(basis)
        self.projection_loaded_unwhitened = False
        if self.needs_whitening:
            self.whitening_ready.fill_(True)

    def apply_whitening(self, result: Mapping[str, torch.Tensor]) -> None:
        self.set_basis(result['basis'].to(device=self.basis.device,
                                          dtype=self.basis.dtype))

    def forward(self) -> torch.Tensor:
        return self.coefficients @ self.basis.t()


def check_rank(rank: Any, num_tokens: int, embed_dims: int,
               whitening_init: bool) -> int:
    """The one rule for ``prompt.rank`` (``p``) of a bilinear prompt.

    ``p > d`` with ``whitening_init`` is refused here, when the prompt is
    built, rather than when whitening runs: ``B = W C`` needs ``p``
    orthonormal columns in ``d`` dimensions. Any other ``p > min(m, d)`` is
    allowed with a warning: ``A B^T`` cannot have rank above ``min(m, d)``,
    so the extra parameters add none.

    Args:
        rank: The configured ``prompt.rank``.
        num_tokens (int): ``m``.
        embed_dims (int): ``d``.
        whitening_init (bool): Whether ``B`` is set by whitening.

    Returns:
        int: ``rank``.
    """
    check_positive_int(rank, 'prompt.rank')
    if whitening_init and rank > embed_dims:
        raise ValueError(
            f'`prompt.rank`={rank} is above embed_dims={embed_dims}: a '
            f'whitening-initialised basis B = W C has at most embed_dims '
            f'orthonormal columns; use prompt.rank <= {embed_dims} or '
            f'whitening_init=False')
    if rank > min(num_tokens, embed_dims):
        warnings.warn(
            f'`prompt.rank`={rank} is above min(num_tokens, embed_dims)='
            f'{min(num_tokens, embed_dims)}: it adds parameters without '
            f'adding rank to the prompts')
    return rank


def prompt_class(type_name: Any) -> Type[BasePrompt]:
    """The registered prompt class named ``type_name`` (``prompt.type``).

    The one check of ``prompt.type``; the scoped spelling
    ``'bpt_mm.WhitenedPrompt'`` is accepted.

    Args:
        type_name: The configured ``prompt.type``.

    Returns:
        type: The prompt class.
    """
    name = type_name
    if isinstance(name, str) and name.startswith('bpt_mm.'):
        name = name[len('bpt_mm.'):]
    known_types = sorted(PROMPTS.module_dict)
    if not isinstance(name, str) or name not in known_types:
        raise ValueError(f'`prompt.type` must be one of {known_types}, '
                         f'got {type_name!r}{did_you_mean(name, known_types)}')
    return PROMPTS.get(name)


def prompt_options(cls: Type[BasePrompt],
                   cfg: Mapping[str, Any]) -> PromptOptions:
    """Build ``cls``'s validated options from its keys in ``cfg``.

    Args:
        cls (type): The prompt class.
        cfg (Mapping): Its type-specific keys (unknown keys are refused by
            the caller, which knows the shared ones).

    Returns:
        PromptOptions: An instance of ``cls.Options``.
    """
    required = option_keys(cls)[1]
    for key in sorted(required - set(cfg)):
        raise ValueError(f'`prompt.{key}` is required for {cls.__name__}')
    return cls.Options(**cfg)


def option_keys(cls: Type[BasePrompt]) -> Tuple[set, set]:
    """Config keys of a prompt type beyond the shared ones.

    Returns:
        tuple[set, set]: all of them, and those without a default (required).
    """
    option_fields = fields(cls.Options)
    required = {f.name for f in option_fields
                if f.default is MISSING and f.default_factory is MISSING}
    return {f.name for f in option_fields}, required


def build_prompt(cls: Type[BasePrompt], options: PromptOptions,
                 num_tokens: int, embed_dims: int, patch_size: int,
                 trainable_projection: bool = True) -> BasePrompt:
    """Build one block's prompt module from its validated options.

    Args:
        cls (type): The prompt class.
        options (PromptOptions): Its validated options.
        num_tokens (int): ``m``.
        embed_dims (int): ``d``.
        patch_size (int): Patch size of the ViT.
        trainable_projection (bool): Whether this block's projection trains.

    Returns:
        BasePrompt: The module.
    """
    kwargs: Dict[str, Any] = {f.name: getattr(options, f.name)
                              for f in fields(options)}
    return cls(num_tokens=num_tokens, embed_dims=embed_dims,
               patch_size=patch_size,
               trainable_projection=trainable_projection, **kwargs)
