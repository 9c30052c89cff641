"""``BPTWhiteningHook``: fill the prompts' whitening from data before training.

mmengine's ``Runner.train`` builds and wraps the model, runs ``before_run``,
``init_weights`` and ``load_or_resume``, then ``before_train``: the hook runs
there, so it sees the pretrained (or resumed) weights, and a resumed run or a
``load_from`` checkpoint whose prompts already hold their whitening (the
persistent buffer ``whitening_ready``) skips the computation. The work itself
is :func:`bpt_mm.whitening.collect.run_whitening` (the body of
``collect_whitening``); SPT prompts get their prototypes from the same
images, count and rules through :func:`bpt_mm.whitening.collect.
run_prototypes` (ready flag: ``prototypes_ready``). Every option is checked
once, when the hook is built (the whitening options as one
:class:`~bpt_mm.whitening.options.WhiteningOptions`), and passed down
unchecked.
"""
import copy
import dataclasses
import inspect
import math
import os
import time
import warnings
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from mmengine.dist import all_reduce, get_world_size
from mmengine.hooks import Hook
from torch import Tensor
from torch.utils.data import DataLoader

from bpt_mm.models.vit import (PromptedViT, find_prompted_backbone,
                               unwrap_model)
from bpt_mm.registry import register_hook
from bpt_mm.utils import find_hook_entry
from bpt_mm.whitening.accumulators import FewTokensWarning
from bpt_mm.whitening.collect import (apply_whitening,
                                      format_prototype_table,
                                      format_whitening_table,
                                      missing_prototype_blocks,
                                      missing_whitening_blocks,
                                      prototype_blocks, run_prototypes,
                                      run_whitening, whitening_blocks)
from bpt_mm.whitening.distributed import synchronise_errors
from bpt_mm.whitening.io import load_whitening
from bpt_mm.whitening.options import (NUM_IMAGES, SEED, WhiteningOptions,
                                      check_positive_int, check_seed)
from bpt_mm.whitening.prototypes import KMEANS_ITERS, PROTOTYPE_TOKENS
from bpt_mm.whitening.real_tokens import (ImageBatch, as_image_batch,
                                          check_no_pipeline_padding,
                                          img_shapes_of)

from .hook_options import refuse_unknown_options

#: Names under which the hook can appear in ``custom_hooks``.
HOOK_TYPES = ('BPTWhiteningHook', 'bpt_mm.BPTWhiteningHook')
#: Options only whitening uses, and options only SPT prototypes use.
WHITENING_OPTIONS = tuple(field.name for field in dataclasses.fields(
    WhiteningOptions)) + ('allow_few_tokens', )
PROTOTYPE_OPTIONS = ('prototype_tokens', 'kmeans_iters')


def preprocessed_batches(model: torch.nn.Module,
                         dataloader: Iterable) -> Iterator[ImageBatch]:
    """Image batches of ``dataloader`` as the model's data preprocessor
    gives them in test mode (``data_preprocessor(data, False)``), with the
    real size of each image (its data sample's ``img_shape``), so that
    statistics can leave the padding out (see
    :mod:`bpt_mm.whitening.real_tokens`).

    A list of images (a preprocessor that does not stack) is stacked when the
    sizes agree and yielded one image at a time otherwise.
    """
    # Checked before any image is read: a pipeline `Pad` hides the padding
    # from `img_shape`, so no later step could leave it out.
    check_no_pipeline_padding(getattr(dataloader, 'dataset', None),
                              'token statistics (whitening, prototypes, '
                              'burstiness)')
    model = unwrap_model(model)
    preprocessor = getattr(model, 'data_preprocessor', None)
    if preprocessor is None:
        raise ValueError(f'{type(model).__name__} has no data_preprocessor;'
                         ' cannot turn data batches into image tensors')
    for data in dataloader:
        for part in _same_size_parts(data):
            yield from _stacked_inputs(preprocessor(part, False))


def preprocessed_images(model: torch.nn.Module,
                        dataloader: Iterable) -> Iterator[Tensor]:
    """The image tensors of :func:`preprocessed_batches` (no sizes)."""
    for batch in preprocessed_batches(model, dataloader):
        yield batch.images


def _same_size_parts(data: Any) -> List[Any]:
    """``data`` itself, or one batch per sample when its images differ in
    size: mmseg's preprocessor refuses to stack those (a random resize and a
    crop can give 512x512 beside 453x453), mmdet's pads them."""
    inputs = data.get('inputs') if isinstance(data, dict) else None
    if not isinstance(inputs, (list, tuple)) or len(
            {tuple(getattr(x, 'shape', ())) for x in inputs}) <= 1:
        return [data]
    samples = data.get('data_samples') or [None] * len(inputs)
    return [dict(data, inputs=[x], data_samples=[s])
            for x, s in zip(inputs, samples)]


def _stacked_inputs(out: Any) -> Iterator[ImageBatch]:
    """The image tensor(s) in a preprocessor's output, as batches with the
    ``img_shape`` of their data samples (None where a sample has none)."""
    inputs = out.get('inputs') if isinstance(out, dict) else None
    samples = out.get('data_samples') if isinstance(out, dict) else None
    if isinstance(inputs, Tensor):
        yield as_image_batch(ImageBatch(inputs, _shapes(samples,
                                                        inputs.shape)))
    elif isinstance(inputs, (list, tuple)) and inputs and all(
            isinstance(x, Tensor) for x in inputs):
        samples = samples or [None] * len(inputs)
        if len({tuple(x.shape) for x in inputs}) == 1:
            images = torch.stack(list(inputs))
            yield as_image_batch(ImageBatch(images, _shapes(samples,
                                                            images.shape)))
        else:
            for x, sample in zip(inputs, samples):
                yield as_image_batch(ImageBatch(
                    x.unsqueeze(0), _shapes([sample], (1, ) + x.shape)))
    else:
        raise ValueError(
            'the data preprocessor must return a dict with `inputs` (a '
            f'batched image tensor), got {type(out).__name__} with '
            f'inputs of type {type(inputs).__name__}')


def _distinct_images(loader: Any) -> Optional[int]:
    """How many distinct images ``loader``'s data set holds (None when it
    has no length, e.g. an iterable data set)."""
    dataset = getattr(loader, 'dataset', None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def images_to_use(loader: Any, num_images: int,
                  purpose: str) -> Tuple[int, Optional[str]]:
    """How many training images a pass over ``loader`` takes: ``num_images``,
    or each image once when the data set holds fewer distinct images (an
    ``InfiniteSampler`` would serve the same images again and again; the
    count is of distinct images, up to the padding of DDP shards). The one
    home of this rule, for the hook and tools/compute_whitening.py.

    Args:
        loader (Any): The training data loader; its ``dataset``'s length
            is the number of distinct images (a data set without a length
            is taken as it comes).
        num_images (int): The images asked for.
        purpose (str): What the images are for, for the messages
            (e.g. ``'whitening'``).

    Returns:
        tuple[int, str | None]: The number of images to use, and the
        warning to show when it is fewer than ``num_images`` (else None).

    Raises:
        ValueError: The data set holds no images (the same on every rank:
            it is the data set's length).
    """
    distinct = _distinct_images(loader)
    if distinct == 0:
        raise ValueError(f'the training set has no images; {purpose} needs '
                         'at least one')
    if distinct is not None and distinct < num_images:
        return distinct, (
            f'`num_images` is {num_images} but the training set has only '
            f'{distinct} distinct images; {purpose} takes each of them '
            f'once ({distinct} images)')
    return num_images, None


def _shapes(samples: Any, batch_shape) -> Any:
    """Each sample's ``img_shape`` (capped at the tensor's size), or None."""
    shapes = img_shapes_of(samples) if isinstance(samples, (list, tuple)) \
        and len(samples) == batch_shape[0] else None
    if shapes is None:
        return None
    height, width = batch_shape[-2:]
    return tuple((min(h, height), min(w, width)) for h, w in shapes)


def hook_options_from_config(cfg: Any) -> Dict[str, Any]:
    """The keyword arguments of the BPTWhiteningHook entry of
    ``cfg.custom_hooks`` ({} when there is none)."""
    entry = find_hook_entry(cfg, HOOK_TYPES) or {}
    return {k: v for k, v in entry.items() if k not in ('type', 'priority')}


def refuse_overwriting_trained_projections(backbone: PromptedViT,
                                           blocks: List[int],
                                           source: Optional[str] = None
                                           ) -> None:
    """Refuse to whiten blocks whose projection came from a checkpoint.

    A checkpoint whose ``whitening_ready`` is False but which holds the
    block's ``B`` (or a ``W`` other than the identity it starts as) was
    trained without whitening (e.g. with ``allow_identity_whitening=True``):
    whitening it now would replace trained weights and evaluate or resume
    another model than the one trained.

    Args:
        backbone (PromptedViT): The backbone, after loading.
        blocks (list[int]): Blocks about to be whitened.
        source (str, optional): The checkpoint, for the message.

    Raises:
        RuntimeError: Naming the blocks, the tensor and the ways out.
    """
    prompts = backbone.prompt_modules()
    loaded = [i for i in blocks
              if getattr(prompts[i], 'projection_loaded_unwhitened', False)]
    if not loaded:
        return
    name = prompts[loaded[0]].projection_name
    raise RuntimeError(
        f'BPTWhiteningHook: the checkpoint {source!r} holds the prompt '
        f'projection `{name}` of blocks {loaded} (e.g. '
        f'`backbone.prompts.{loaded[0]}.{name}`) but marks it not whitened '
        '(`whitening_ready` is False): it was trained without whitening, '
        'and whitening it now would overwrite trained weights. To use the '
        'checkpoint as trained, remove BPTWhiteningHook from `custom_hooks` '
        'and set `model.backbone.prompt.allow_identity_whitening=True`; to '
        'whiten from scratch, start without this checkpoint')


def refuse_overwriting_trained_prompts(backbone: PromptedViT,
                                       blocks: List[int],
                                       source: Optional[str] = None) -> None:
    """Refuse to compute SPT prototypes over prompt tokens that came from
    a checkpoint which does not mark them as prototypes (``prototypes_ready``
    False or absent: a VPT checkpoint, or SPT trained from VPT's start):
    the prototypes would replace trained weights.

    Raises:
        RuntimeError: Naming the blocks, the tensor and the ways out.
    """
    prompts = backbone.prompt_modules()
    loaded = [i for i in blocks if getattr(
        prompts[i], 'tokens_loaded_without_prototypes', False)]
    if loaded:
        raise RuntimeError(
            f'BPTWhiteningHook: the checkpoint {source!r} holds the prompt '
            f'tokens of blocks {loaded} (e.g. `backbone.prompts.'
            f'{loaded[0]}.tokens`) but does not mark them as SPT '
            'prototypes (`prototypes_ready` is False or absent): computing '
            'prototypes now would overwrite trained weights. To use the '
            'checkpoint as trained, remove BPTWhiteningHook from '
            '`custom_hooks` and set '
            '`model.backbone.prompt.allow_identity_whitening=True`; to '
            'start SPT from prototypes, start without this checkpoint')


@register_hook()
class BPTWhiteningHook(Hook):
    """Compute the ZCA whitening of BPT prompts from training images.

    Before the first training iteration, for every prompted block whose
    prompt needs whitening (``WhitenedPrompt``: BPT-fWhiten/tWhiten;
    ``BilinearPrompt(whitening_init=True)``), the hook runs ``num_images``
    training images through the backbone, accumulates the query-key
    projected tokens entering the block and writes ``W = Sigma^{-1/2}`` into
    the prompt (``B = W C`` for a bilinear one). Only real image tokens
    count: a patch enters when it overlaps its image's ``img_shape`` (the
    data sample's; patches of batch padding are left out, see
    :mod:`bpt_mm.whitening.real_tokens`). Per block it logs the tokens kept
    and the padding tokens dropped, the condition number of ``Sigma + reg``
    and the time taken.

    SPT prompts (``SPTPrompt``) instead get their initial values from the
    same ``num_images`` training images, under the same rules: prototypes
    (the prompt's ``init``) of at most ``prototype_tokens`` tokens drawn
    from each prompted block, gathered over the processes, computed on
    rank 0 and broadcast; the buffer ``prototypes_ready`` marks them done.

    It does nothing when no prompt needs whitening or prototypes, and skips
    the computation when every such prompt already holds it (a resumed run,
    or a checkpoint from ``load_from``); the decision is the same on all
    ranks. Options set away from their defaults that the model's prompts do
    not use (whitening options for SPT prompts, SPT options for whitened
    ones) are named in a warning.
    Under DDP each rank uses ``ceil(num_images / world_size)`` of its own
    images; the statistics are summed and rank 0's matrices are broadcast.

    ``before_val`` / ``before_test`` fill whitening that is still missing
    (``tools/test.py`` with a checkpoint that lacks it), from a loader built
    from ``cfg.train_dataloader``; with whitening in place they do nothing.

    Args:
        num_images (int): Training images for the statistics, over all
            processes. Defaults to 100 (the paper).
        eps, source, tokens, center, statistic, product, bilinear_init:
            The whitening options, with the defaults and meanings of
            :class:`~bpt_mm.whitening.options.WhiteningOptions` (the
            paper's statistic; ``bilinear_init`` chooses ``C`` of
            ``B = W C`` for whitening-initialised bilinear prompts); they
            are checked there and kept as :attr:`options`.
        whitening_file (str, optional): Load the matrices from a file written
            by ``tools/compute_whitening.py`` instead of computing them.
        seed (int): Seed of the random ``C`` and of the SPT token draws
            (block ``i`` uses ``seed + i``). Defaults to 0.
        allow_few_tokens (bool): Whiten even when the paper's statistic has
            fewer tokens (over all processes) than channels, where ``Sigma``
            is rank deficient and ``W`` is set by ``eps`` alone in the
            missing directions. Defaults to False: refused, naming the block
            and the counts.
        prototype_tokens (int): SPT only: most tokens per block the
            prototypes are computed from, over all processes (a uniform
            random sample of all the images' tokens beyond that). Defaults
            to 20000 (61 MB at d = 768).
        kmeans_iters (int): SPT ``init='kmeans'`` only: most Lloyd
            iterations. Defaults to 50.

    Attributes:
        options (WhiteningOptions): The whitening options.
        status (str): What the last call did: ``'not_run'``,
            ``'no_backbone'``, ``'not_needed'``, ``'restored'``, ``'file'``
            or ``'computed'`` (whitening or prototypes alike).
        results (dict): Per-block results of the last computation or load.
    """

    # After checkpoint loading (before_train follows load_or_resume) and
    # before hooks of NORMAL priority that might look at the prompts.
    priority = 'ABOVE_NORMAL'

    def __init__(self,
                 num_images: int = NUM_IMAGES,
                 eps: float = WhiteningOptions.eps,
                 source: str = WhiteningOptions.source,
                 tokens: str = WhiteningOptions.tokens,
                 center: bool = WhiteningOptions.center,
                 statistic: str = WhiteningOptions.statistic,
                 product: str = WhiteningOptions.product,
                 bilinear_init: str = WhiteningOptions.bilinear_init,
                 whitening_file: Optional[str] = None,
                 seed: int = SEED,
                 allow_few_tokens: bool = False,
                 prototype_tokens: int = PROTOTYPE_TOKENS,
                 kmeans_iters: int = KMEANS_ITERS,
                 **unknown: Any) -> None:
        refuse_unknown_options('BPTWhiteningHook', BPTWhiteningHook.__init__,
                               unknown)
        if not isinstance(allow_few_tokens, bool):
            raise ValueError('BPTWhiteningHook `allow_few_tokens` must be a '
                             f'bool, got {allow_few_tokens!r}')
        check_positive_int(num_images, 'BPTWhiteningHook `num_images`')
        try:
            # WhiteningOptions checks the whitening options and names each.
            self.options = WhiteningOptions(
                tokens=tokens, source=source, center=center,
                statistic=statistic, product=product, eps=eps,
                bilinear_init=bilinear_init)
        except ValueError as exc:
            raise ValueError(f'BPTWhiteningHook {exc}') from None
        if whitening_file is not None and not isinstance(
                whitening_file, (str, os.PathLike)):
            raise ValueError('BPTWhiteningHook `whitening_file` must be None '
                             f'or a path, got {whitening_file!r}')
        check_seed(seed, 'BPTWhiteningHook `seed`')
        for key, value in (('prototype_tokens', prototype_tokens),
                           ('kmeans_iters', kmeans_iters)):
            check_positive_int(value, f'BPTWhiteningHook `{key}`')
        self.prototype_tokens = prototype_tokens
        self.kmeans_iters = kmeans_iters
        defaults = {name: p.default for name, p in inspect.signature(
            BPTWhiteningHook.__init__).parameters.items()}
        given = dict(eps=eps, source=source, tokens=tokens, center=center,
                     statistic=statistic, product=product,
                     bilinear_init=bilinear_init,
                     allow_few_tokens=allow_few_tokens,
                     prototype_tokens=prototype_tokens,
                     kmeans_iters=kmeans_iters)
        # Options away from their defaults, to name those that go unused.
        self._set_options = {k for k, v in given.items() if v != defaults[k]}
        self.num_images = num_images
        self.whitening_file = whitening_file
        self.seed = seed
        self.allow_few_tokens = allow_few_tokens
        self.status = 'not_run'
        self.results: Dict[int, Dict[str, Any]] = {}
        self._confirmed = False

    # ----------------------------------------------------------- hook points
    def before_train(self, runner) -> None:
        self._ensure_whitening(runner, lambda: self._train_loader(runner),
                               'before training')

    def before_val(self, runner) -> None:
        self._ensure_whitening(runner, lambda: self._config_loader(runner),
                               'before validation')

    def before_test(self, runner) -> None:
        self._ensure_whitening(runner, lambda: self._config_loader(runner),
                               'before testing')

    # --------------------------------------------------------------- helpers
    @staticmethod
    def _train_loader(runner):
        """A loader of its own over the training set.

        Reading from ``runner.train_dataloader`` itself would move shared
        sampler state (mmdet's AspectRatioBatchSampler keeps its buckets
        across iterators), so the training batches would depend on whether
        whitening ran, and a resumed run would not see the batches of an
        uninterrupted one. The data set object is reused, not rebuilt.
        """
        # A Runner built from keyword arguments keeps the loader config in
        # `_train_dataloader` only (see _config_loader). Iterating the
        # training loader itself would also close an InfiniteSampler's
        # one generator when whitening stops drawing, and training would
        # then get no batch at all.
        cfg = runner.cfg.get('train_dataloader', None) or getattr(
            runner, '_train_dataloader', None)
        if not isinstance(cfg, dict):
            # A DataLoader built by the caller: its sampler cannot be
            # rebuilt, and mmengine's InfiniteSampler serves every iterator
            # from its one generator, which this pass would close (training
            # then stops with StopIteration). The data set is read in
            # order instead, split over the ranks as training splits it.
            from mmengine.dataset import DefaultSampler
            loader = runner.train_dataloader
            batch_size = loader.batch_size or getattr(
                loader.batch_sampler, 'batch_size', 1)
            return DataLoader(loader.dataset, batch_size=batch_size,
                              sampler=DefaultSampler(loader.dataset,
                                                     shuffle=False),
                              collate_fn=loader.collate_fn)
        cfg = copy.deepcopy(cfg)
        cfg['dataset'] = runner.train_dataloader.dataset
        return runner.build_dataloader(cfg, seed=runner.seed)

    @staticmethod
    def _config_loader(runner):
        # Runner.from_cfg keeps the config in runner.cfg; a Runner built from
        # keyword arguments only keeps its own (private) copy.
        cfg = runner.cfg.get('train_dataloader', None) or getattr(
            runner, '_train_dataloader', None)
        if isinstance(cfg, DataLoader):
            return cfg
        if not cfg:
            raise ValueError(
                'BPTWhiteningHook: the model has prompts without whitening '
                'and the config has no `train_dataloader` to compute it '
                'from; load a checkpoint that holds it or set '
                '`whitening_file`')
        return runner.build_dataloader(copy.deepcopy(cfg), seed=runner.seed)

    def _ensure_whitening(self, runner, get_loader, when: str) -> None:
        if self._confirmed:
            return  # nothing can have removed it since
        logger = runner.logger
        backbone = find_prompted_backbone(runner.model)
        if backbone is None:
            self.status = 'no_backbone'
            logger.warning('BPTWhiteningHook: the model is not a PromptedViT '
                           'and has no PromptedViT `backbone`; nothing to '
                           'whiten')
            self._confirmed = True
            return
        needing = whitening_blocks(backbone)
        if not needing and prototype_blocks(backbone):
            self._ensure_prototypes(runner, backbone, get_loader, when)
            self._confirmed = True
            return
        if not needing:
            self.status = 'not_needed'
            config = backbone.prompt_config
            logger.info('BPTWhiteningHook: no prompt needs whitening '
                        f'({None if config is None else config.type}); '
                        'nothing to do')
            self._confirmed = True
            return
        # Same decision on every rank: a block counts as done only if it is
        # done everywhere.
        missing = _missing_on_any_rank(needing,
                                       missing_whitening_blocks(backbone))
        if not missing:
            self.status = 'restored'
            logger.info('BPTWhiteningHook: whitening matrices restored from '
                        f'checkpoint; skipping (blocks {needing})')
            self._confirmed = True
            return
        refuse_overwriting_trained_projections(backbone, missing,
                                               getattr(runner, '_load_from',
                                                       None))
        if len(missing) < len(needing):
            done = sorted(set(needing) - set(missing))
            logger.info(f'BPTWhiteningHook: blocks {done} hold whitening '
                        f'from the checkpoint; computing blocks {missing}')
        if self.whitening_file is not None:
            self._load_file(runner, backbone, missing)
        else:
            self._compute(runner, backbone, missing, get_loader, when)
        self._confirmed = True

    def _ensure_prototypes(self, runner, backbone, get_loader,
                           when: str) -> None:
        """The SPT counterpart of the whitening steps of
        :meth:`_ensure_whitening`: restored prototypes skip, missing ones
        are computed from the same images."""
        logger = runner.logger
        needing = prototype_blocks(backbone)
        missing = _missing_on_any_rank(needing,
                                       missing_prototype_blocks(backbone))
        if not missing:
            self.status = 'restored'
            logger.info('BPTWhiteningHook: SPT prototypes restored from '
                        f'checkpoint; skipping (blocks {needing})')
            return
        refuse_overwriting_trained_prompts(backbone, missing,
                                           getattr(runner, '_load_from',
                                                   None))
        if self.whitening_file is not None:
            raise ValueError(
                f'BPTWhiteningHook `whitening_file` '
                f'({self.whitening_file!r}) holds whitening matrices, but '
                f'the SPTPrompt prompts of blocks {missing} need prototypes'
                ', which are computed from training images: remove '
                '`whitening_file`')
        self._warn_unused(logger, WHITENING_OPTIONS, 'SPT prototypes')
        start = time.perf_counter()
        batches, asked = self._training_images(runner, get_loader,
                                               'the SPT prototypes')
        per_rank = math.ceil(asked / get_world_size())
        logger.info(
            f'BPTWhiteningHook: computing SPT prototypes {when} for blocks '
            f'{missing} from {asked} training images ({per_rank} '
            f'per process), at most {self.prototype_tokens} tokens per block')
        # Every option was checked when the hook was built.
        results = run_prototypes(
            backbone, batches, per_rank, distributed=True, blocks=missing,
            seed=self.seed, max_tokens=self.prototype_tokens,
            kmeans_iters=self.kmeans_iters)
        total = min(r['num_images'] for r in results.values())
        if total < self.num_images:
            logger.warning(f'BPTWhiteningHook: only {total} images were '
                           f'available (asked for {self.num_images})')
        self.results, self.status = results, 'computed'
        logger.info(f'BPTWhiteningHook: SPT prototypes per block (computed '
                    f'in {time.perf_counter() - start:.1f} s):\n'
                    + format_prototype_table(results))

    def _load_file(self, runner, backbone, missing: List[int]) -> None:
        error = results = info = None
        try:
            results, info = load_whitening(self.whitening_file, backbone,
                                           return_info=True)
            results = {i: results[i] for i in missing}
            apply_whitening(backbone, results, self.options, self.seed)
        except Exception as exc:  # noqa: BLE001 (re-raised on every rank)
            error = exc
        synchronise_errors(error, f'loading {self.whitening_file!r}')
        stored = info.get('statistics', {})
        mine = {k: getattr(self.options, k, None) for k in stored}
        if stored != mine:
            runner.logger.warning(
                f'BPTWhiteningHook: {self.whitening_file!r} was computed '
                f'with {stored}; this hook is configured with {mine} (the '
                'file is used)')
        made_for = (info.get('prompt_type'), info.get('prompt_depth'))
        config = backbone.prompt_config
        later = [i for i in missing if i > min(whitening_blocks(backbone))]
        if later and made_for != (config.type, config.depth):
            # A deep block's tokens pass through the prompts of the blocks
            # before it, so its statistic was taken with the file's prompts
            # there; the qkv fingerprint cannot see that difference.
            runner.logger.warning(
                f'BPTWhiteningHook: {self.whitening_file!r} was computed '
                f'for {made_for[0]} prompts (depth {made_for[1]!r}); this '
                f'model has {config.type} prompts (depth '
                f'{config.depth!r}). The statistics of blocks {later} were '
                'taken on tokens that passed the earlier blocks\' prompts '
                'of that other model, so their W may not fit this one: '
                'compute the file again with tools/compute_whitening.py on '
                'this config (the file is used)')
        self.results, self.status = results, 'file'
        runner.logger.info(
            f'BPTWhiteningHook: whitening of blocks {missing} loaded from '
            f'{self.whitening_file!r} ({info.get("num_images")} images):\n'
            + format_whitening_table(results))

    def _warn_unused(self, logger, options, what: str) -> None:
        unused = sorted(self._set_options.intersection(options))
        if unused:
            logger.warning(f'BPTWhiteningHook: {unused} are set but not '
                           f'used: this model\'s prompts need {what}')

    def _training_images(self, runner, get_loader, purpose: str):
        """The preprocessed training batches, and how many images to use
        (:func:`images_to_use`). A failure to build the loader on any rank
        is raised on every rank."""
        error = batches = loader = None
        try:
            loader = get_loader()
            batches = preprocessed_batches(runner.model, loader)
        except Exception as exc:  # noqa: BLE001
            error = exc
        synchronise_errors(error, f'building the data loader of {purpose}')
        try:
            asked, note = images_to_use(loader, self.num_images, purpose)
        except ValueError as exc:
            raise ValueError(f'BPTWhiteningHook: {exc}') from None
        if note is not None:
            runner.logger.warning(f'BPTWhiteningHook: {note}')
        return batches, asked

    def _compute(self, runner, backbone, missing: List[int], get_loader,
                 when: str) -> None:
        self._warn_unused(runner.logger, PROTOTYPE_OPTIONS, 'whitening')
        start = time.perf_counter()
        world = get_world_size()
        batches, asked = self._training_images(runner, get_loader,
                                               'whitening')
        per_rank = math.ceil(asked / world)
        runner.logger.info(
            f'BPTWhiteningHook: computing whitening {when} for blocks '
            f'{missing} from {asked} training images '
            f'({per_rank} per process) with {self.options}')
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always', FewTokensWarning)
            # Every option was checked when the hook was built.
            results = run_whitening(
                backbone, batches, self.options, per_rank,
                distributed=True, blocks=missing, seed=self.seed,
                allow_few_tokens=self.allow_few_tokens)
        for warning in caught:
            if issubclass(warning.category, FewTokensWarning):
                runner.logger.warning(f'BPTWhiteningHook: {warning.message}')
            else:  # e.g. from the data pipeline: not ours to reword
                warnings.warn_explicit(warning.message, warning.category,
                                       warning.filename, warning.lineno)
        total = min(r['num_images'] for r in results.values())
        if total < asked:
            runner.logger.warning(
                f'BPTWhiteningHook: only {total} images were available '
                f'(asked for {self.num_images})')
        self.results, self.status = results, 'computed'
        runner.logger.info(
            f'BPTWhiteningHook: whitening per block (computed in '
            f'{time.perf_counter() - start:.1f} s):\n'
            + format_whitening_table(results))


def _missing_on_any_rank(needing: List[int], local_missing: List[int]
                         ) -> List[int]:
    """The blocks of ``needing`` missing on any rank: every rank takes the
    same decision (a block counts as done only if it is done everywhere).
    """
    local = set(local_missing)
    flags = torch.tensor([int(i in local) for i in needing],
                         dtype=torch.int64)
    all_reduce(flags, op='max')
    return [i for i, f in zip(needing, flags.tolist()) if f]
