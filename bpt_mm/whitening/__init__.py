"""The token-statistics wing of bpt_mm: whitening and SPT prototypes.

Import from the module that owns a name (nothing is re-exported here):

* :mod:`~bpt_mm.whitening.options`: :class:`WhiteningOptions`, every
  whitening option with its one default and its one check;
* :mod:`~bpt_mm.whitening.linalg`: the query-key product, the projection of
  tokens, the one eigendecomposition of ``Sigma`` (``W``, condition number,
  effective rank) and the bilinear basis;
* :mod:`~bpt_mm.whitening.accumulators`: the paper's and the authors'
  second moments, streamed in float64;
* :mod:`~bpt_mm.whitening.collect`: the tokens -> ``Sigma`` -> ``W``
  pipeline, and the block-by-block pass over a backbone for whitening and
  SPT prototypes;
* :mod:`~bpt_mm.whitening.io`: the whitening file;
* :mod:`~bpt_mm.whitening.prototypes`: SPT prototype math;
* :mod:`~bpt_mm.whitening.real_tokens`: which patches of a padded batch are
  image;
* :mod:`~bpt_mm.whitening.distributed`: the few ``torch.distributed`` steps.

The wing may import :mod:`bpt_mm.models`; the models never import it.
"""
