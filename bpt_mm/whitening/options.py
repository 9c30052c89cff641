"""The options of one whitening computation, each with its one default and
its one check (pure Python, but for the token tap's choices, which
the model owns).

:class:`WhiteningOptions` is built once, by whoever reads the options from a
user (``BPTWhiteningHook``, ``tools/compute_whitening.py``, the burstiness
analysis), and passed down; nothing downstream re-checks or re-defaults
them. The small checks below are the wing's only copies of each rule; the
linear algebra and the accumulators use them for their own arguments.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional, Union

from bpt_mm.choices import check_choice
# Which tokens enter the statistic and where they are taken: the token
# tap's choices, whose home is the model.
from bpt_mm.models.vit import TOKEN_SETS, TOKEN_SOURCES

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .accumulators import ImageAverageAccumulator, SecondMomentAccumulator

__all__ = ['QK_ORDERS', 'STATISTICS', 'BASIS_MODES', 'NUM_IMAGES', 'SEED',
           'WhiteningOptions', 'check_positive_int', 'check_eps',
           'check_seed']

#: Query-key products (see :func:`~bpt_mm.whitening.linalg.query_key_product`).
QK_ORDERS = ('qk', 'kq', 'authors', 'authors_mae')
#: The paper's and the authors' statistic.
STATISTICS = ('paper', 'authors')
#: ``C`` of a bilinear prompt's ``B = W C``.
BASIS_MODES = ('random', 'eigen', 'identity')
#: Images the token statistics read by default (the paper's 100), for the
#: whitening, the SPT prototypes and the burstiness analysis alike.
NUM_IMAGES = 100
#: Default seed of their random draws (a bilinear prompt's ``C``, the
#: prototypes' reservoirs and draws, the analysis' subsets).
SEED = 0


def label_prefix(name: Optional[str]) -> str:
    """``'name: '`` (or ``''``): error messages start with the block label
    so that a failure among twelve blocks says which one it was."""
    return f'{name}: ' if name else ''


def check_positive_int(value: Any, arg: str) -> int:
    """``value`` if it is a positive int (never a bool), else a ValueError
    naming ``arg``.

    Args:
        value: The value to check.
        arg (str): Its name in the message, e.g. ``'num_images'`` or
            ``'BPTWhiteningHook `num_images`'`` (backquoted when bare).
    """
    name = arg if '`' in arg else f'`{arg}`'
    # bool is an int subclass; dim=True is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        shown = f'{value!r}' if isinstance(value, int) \
            and not isinstance(value, bool) \
            else f'{value!r} ({type(value).__name__})'
        raise ValueError(f'{name} must be a positive int, got {shown}')
    return value


def check_seed(seed: Any, arg: str = 'seed') -> int:
    """``seed`` if it is an int (never a bool), else a ValueError naming
    ``arg``.

    Args:
        seed: The value to check.
        arg (str): Its name in the message (backquoted when bare, as in
            :func:`check_positive_int`). Defaults to ``'seed'``.
    """
    name = arg if '`' in arg else f'`{arg}`'
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f'{name} must be an int, got {seed!r}')
    return seed


def check_eps(eps: Any) -> float:
    """The rule of the ZCA regulariser: a finite number ``>= 0``.

    Args:
        eps: The value to check.

    Returns:
        float: ``eps`` as a float.
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) \
            or not math.isfinite(eps) or eps < 0:
        raise ValueError(f'`eps` must be a finite float >= 0, got {eps!r}')
    return float(eps)


@dataclass(frozen=True)
class WhiteningOptions:
    """Every option of a whitening computation, checked once.

    The defaults are the paper's definition; every field the authors' code
    sets differently can be switched to reproduce it (``statistic='authors'``,
    ``product='authors'``, ``tokens='all'``, ``eps`` small). One object
    describes the whole choice and is logged with the result; the fields
    that define ``Sigma`` and ``W`` (:meth:`statistic_fields`) are stored in
    a whitening file.

    Args:
        tokens (str): Which tokens enter ``Sigma``: ``'patch'`` (default;
            CLS and prompts excluded, as in the paper) or ``'all'`` (CLS and
            patches, as the authors' code; never prompts).
        source (str): Where the tokens are taken: ``'block_input'``
            (default; the tokens entering the block, before its LayerNorm,
            as the authors) or ``'norm1'`` (the LayerNorm output that the
            attention really sees).
        center (bool): Subtract the mean token before the second moment.
            Defaults to False (as the paper).
        statistic (str): ``'paper'`` (default): ``Sigma = X~ X~^T / N`` over
            all ``N`` tokens. ``'authors'``: average ``X~`` (``d x n``) over
            the images first, then ``Sigma = X~_avg X~_avg^T / d``; needs a
            fixed ``n`` per image (see
            :class:`~bpt_mm.whitening.accumulators.ImageAverageAccumulator`).
        product (str): The query-key product, see
            :func:`~bpt_mm.whitening.linalg.query_key_product`: ``'qk'``
            (default), ``'kq'``, ``'authors'`` or ``'authors_mae'``
            (``W_q W_q^T``, the authors' MAE shallow file).
        eps (float): Relative regulariser of the ZCA (see
            :func:`~bpt_mm.whitening.linalg.zca_whitening_matrix`).
            Defaults to 1e-5.
        bilinear_init (str): ``C`` of ``B = W C`` for whitening-initialised
            bilinear prompts: ``'random'`` (default), ``'eigen'`` or
            ``'identity'`` (see
            :func:`~bpt_mm.whitening.linalg.whitened_bilinear_basis`).

    Examples:
        >>> opts = WhiteningOptions(statistic='authors', product='authors')
        >>> type(opts.make_accumulator(8, name='block 0')).__name__
        'ImageAverageAccumulator'
        >>> WhiteningOptions.eps
        1e-05
    """

    tokens: str = TOKEN_SETS[0]
    source: str = TOKEN_SOURCES[0]
    center: bool = False
    statistic: str = 'paper'
    product: str = 'qk'
    eps: float = 1e-5
    bilinear_init: str = 'random'

    def __post_init__(self) -> None:
        check_choice(self.tokens, TOKEN_SETS, 'tokens')
        check_choice(self.source, TOKEN_SOURCES, 'source')
        check_choice(self.statistic, STATISTICS, 'statistic')
        check_choice(self.product, QK_ORDERS, 'product')
        if not isinstance(self.center, bool):
            raise ValueError(f'`center` must be a bool, got '
                             f'{self.center!r}')
        if self.center and self.statistic == 'authors':
            raise ValueError('`center`=True is not defined for '
                             "`statistic`='authors'")
        check_eps(self.eps)
        check_choice(self.bilinear_init, BASIS_MODES, 'bilinear_init')

    def statistic_fields(self) -> Dict[str, Any]:
        """The fields that define ``Sigma`` and ``W`` (all but
        ``bilinear_init``, which only the prompts' ``B`` depends on), as a
        whitening file stores them."""
        fields = dataclasses.asdict(self)
        fields.pop('bilinear_init')
        return fields

    def make_accumulator(
        self, dim: int, name: Optional[str] = None,
        device: Union[str, 'torch.device'] = 'cpu'
    ) -> Union['SecondMomentAccumulator', 'ImageAverageAccumulator']:
        """A fresh accumulator for :attr:`statistic`.

        Args:
            dim (int): Token width ``d``.
            name (str, optional): Label for messages, e.g. ``'block 3'``.
            device (str | torch.device): Where the sums live.

        Returns:
            SecondMomentAccumulator | ImageAverageAccumulator: Both have
            ``update``, ``merge``, ``all_reduce``, ``second_moment``,
            ``state_dict`` and ``load_state_dict``.
        """
        from .accumulators import (ImageAverageAccumulator,
                                   SecondMomentAccumulator)
        if self.statistic == 'paper':
            return SecondMomentAccumulator(dim, name=name, device=device)
        return ImageAverageAccumulator(dim, name=name, device=device)
