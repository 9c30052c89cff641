"""PromptedViT: a (frozen) Vision Transformer whose attention sees prompts.

Built from timm's pieces (``PatchEmbed``, ``Block``) with timm's parameter
names, so timm/DeiT/MAE checkpoints load without renaming (others are
converted by :mod:`bpt_mm.models.checkpoint`).

Token layout entering block 0: ``[CLS, P~, patches]``. Prompts are inserted
after the position embedding is added, so they have none.

* ``depth='shallow'``: one prompt module; ``P~`` enters before block 0 and
  its tokens travel through every block.
* ``depth='deep'``: one prompt module per prompted block; at each prompted
  block that block's ``P~`` replaces the previous prompts, whose outputs are
  dropped. A deep prompt therefore only ever gives keys and values, which is
  how it is computed (see :mod:`bpt_mm.models.attention`).
"""
import os
from functools import partial
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import MMLogger
from mmengine.model import BaseModule, BaseTTAModel, is_model_wrapper
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from bpt_mm.choices import did_you_mean
from bpt_mm.registry import register_model
from .attention import block_prompt_keys_values, prompted_block_forward
from .checkpoint import resample_pos_embed
from .frozen_state import (EXTRA_STATE_KEY, complete_frozen_state,
                           frozen_extra_state, frozen_fingerprint,
                           parse_extra_state)
from .prompt_config import PromptConfig
from .prompt_config import normalise_indices as _normalise_indices
from .prompts import BasePrompt, build_prompt, check_positive_int

#: The token sets :meth:`PromptedViT.block_tokens` selects (the first is
#: the default: patches only, as the paper's statistic).
TOKEN_SETS = ('patch', 'all')
#: Where it takes them (the first is the default: the block's input).
TOKEN_SOURCES = ('block_input', 'norm1')

ARCH_SETTINGS = {
    'tiny': dict(embed_dims=192, num_layers=12, num_heads=3, mlp_ratio=4.0),
    'small': dict(embed_dims=384, num_layers=12, num_heads=6, mlp_ratio=4.0),
    'base': dict(embed_dims=768, num_layers=12, num_heads=12, mlp_ratio=4.0),
    'large': dict(embed_dims=1024, num_layers=24, num_heads=16,
                  mlp_ratio=4.0),
    'huge': dict(embed_dims=1280, num_layers=32, num_heads=16, mlp_ratio=4.0),
}

#: timm, MAE and DeiT all use LayerNorm with eps 1e-6 (not torch's 1e-5).
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class WhiteningNotReadyError(RuntimeError):
    """Training was started with whitening matrices that were never filled."""


def _parse_arch(arch: Union[str, dict]) -> dict:
    if isinstance(arch, str):
        names = sorted(ARCH_SETTINGS)
        if arch.lower() not in names:
            raise ValueError(f'`arch` must be one of {names} '
                             f'or a dict with keys embed_dims, num_layers, '
                             f'num_heads, mlp_ratio; got {arch!r}'
                             f'{did_you_mean(arch.lower(), names)}')
        return dict(ARCH_SETTINGS[arch.lower()])
    if isinstance(arch, dict):
        required = {'embed_dims', 'num_layers', 'num_heads'}
        allowed = required | {'mlp_ratio'}
        missing = required - set(arch)
        unknown = set(arch) - allowed
        if missing or unknown:
            raise ValueError(f'`arch` dict needs keys {sorted(required)} '
                             f'(optional: mlp_ratio); missing '
                             f'{sorted(missing)}, unknown {sorted(unknown)}')
        for key in required:
            check_positive_int(arch[key], f'arch.{key}')
        ratio = arch.get('mlp_ratio', 4.0)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) \
                or not 0 < ratio < float('inf'):
            raise ValueError(f'`arch.mlp_ratio` must be a positive number, '
                             f'got {ratio!r}')
        if int(arch['embed_dims'] * ratio) < 1:
            # timm's Block takes int(dim * mlp_ratio) as the hidden width
            # and its Mlp replaces a width of 0 by the input width.
            raise ValueError(
                f"`arch.mlp_ratio` {ratio!r} gives an MLP hidden width of "
                f"int({arch['embed_dims']} * {ratio!r}) = 0 (timm would use "
                f"{arch['embed_dims']} instead without saying so); it must "
                f"be at least 1 / embed_dims = {1 / arch['embed_dims']:.3g}")
        if arch['embed_dims'] % arch['num_heads']:
            raise ValueError(f"`arch.embed_dims` ({arch['embed_dims']}) must "
                             f"be divisible by `arch.num_heads` "
                             f"({arch['num_heads']})")
        return {'mlp_ratio': 4.0, **arch}
    raise TypeError(f'`arch` must be a str or a dict, got {type(arch)}')


def _check_bool(value, key: str) -> bool:
    """Refuse non-bools: ``frozen='False'`` is a truthy string, so a typo
    would silently train (or freeze) the wrong weights."""
    if not isinstance(value, bool):
        raise TypeError(f'`{key}` must be True or False, got {value!r} '
                        f'({type(value).__name__})')
    return value


def _check_img_size(img_size) -> None:
    sizes = img_size if isinstance(img_size, (list, tuple)) else (img_size, )
    if len(sizes) not in (1, 2) or any(
            isinstance(s, bool) or not isinstance(s, int) or s <= 0
            for s in sizes):
        raise ValueError(f'`img_size` must be a positive int or a (height, '
                         f'width) pair of positive ints, got {img_size!r}')


def _check_layer_scale(value) -> Optional[float]:
    """None for no layer scale (0 is the same: timm's ``Block`` builds an
    identity for a falsy ``init_values``), else a positive float."""
    if value is None or (not isinstance(value, bool)
                         and isinstance(value, (int, float)) and value == 0):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value < float('inf'):
        raise ValueError(f'`layer_scale_init_value` must be None (no layer '
                         f'scale) or a positive number, got {value!r}')
    return float(value)


#: Model zoos whose mmengine tables hold CNN weights only (no ViT): a
#: `pretrained` from them is an mmseg base's default for its ResNet.
_CNN_ZOOS = ('open-mmlab://', 'openmmlab://', 'torchvision://', 'modelzoo://')


def _check_forwarded_pretrained(pretrained, init_cfg) -> None:
    """Refuse at build a ``pretrained`` that cannot be this ViT's weights.

    mmseg's segmentors pass ``model.pretrained`` to the backbone, and its
    model bases set it for their ResNet (``'open-mmlab://resnet50_v1c'``):
    a config that swaps in PromptedViT inherits it.
    """
    fix = ('set `model.pretrained=None` in the config (mmseg passes '
           '`model.pretrained` to the backbone) and give the ViT weights as '
           "`model.backbone.init_cfg=dict(type='Pretrained', "
           "checkpoint=PATH)`")
    if not isinstance(pretrained, str):
        raise TypeError(f'`pretrained` must be a checkpoint path (str), got '
                        f'{pretrained!r}')
    if init_cfg is not None:
        raise ValueError(f'give the checkpoint either as `pretrained` or '
                         f'as `init_cfg`, not both (got {pretrained!r} and '
                         f'{init_cfg!r}): {fix}')
    if pretrained.startswith(_CNN_ZOOS):
        raise ValueError(f'`pretrained` is {pretrained!r}, a CNN from a '
                         f'model zoo (an mmseg base sets it for its ResNet), '
                         f'not weights of this ViT: {fix}')


@register_model()
class PromptedViT(BaseModule):
    """Vision Transformer backbone with BPT/VPT prompts for dense prediction.

    Args:
        arch (str | dict): ``'tiny' | 'small' | 'base' | 'large' | 'huge'`` or
            a dict with ``embed_dims, num_layers, num_heads`` and optional
            ``mlp_ratio``.
        img_size (int | tuple): Pretraining image size; it sets the size of
            the position embedding, which is resampled to any input size at
            run time.
        patch_size (int): Patch size. Inputs that are not a multiple of it are
            zero-padded at the bottom/right.
        in_channels (int): Input channels.
        qkv_bias (bool): Bias in the qkv projection (True for MAE/DeiT/timm).
        patch_bias (bool): Bias in the patch embedding's convolution (True
            for timm/MAE/DeiT; False for mmseg's ``VisionTransformer``, whose
            default it is, and mmpretrain's ``pre_norm=True`` ViTs).
        pre_norm (bool): A LayerNorm (timm's ``norm_pre``) on the embedded
            tokens, after the position embedding and before the prompts and
            block 0, as mmpretrain's ``pre_norm=True`` (CLIP-style) ViTs and
            mmseg's ``ln_pre``. Defaults to False.
        layer_scale_init_value (float, optional): Layer scale (timm's
            ``ls1``/``ls2``, DeiT III's ``gamma_1``/``gamma_2``,
            mmpretrain's ``gamma1``/``gamma2``) initialised to this value in
            every block; None (default) or 0 for none.
        pos_embed_antialias (bool): Resample the position embedding (at
            load and for other input sizes) as timm does, bicubic with
            antialiasing. Defaults to False: plain bicubic
            (``align_corners=False``), as MAE's and ViTDet's code.
        class_token (bool): Whether the model has a class token. It stays
            first; prompts go between it and the patch tokens.
        no_embed_class (bool): The position embedding covers the patch grid
            only and the class token is added without one, as in DeiT III
            (timm's ``no_embed_class=True``, FlexiViT). Defaults to False
            (MAE, DeiT, mmpretrain, mmseg: the class token has a position).
        drop_path_rate (float): Stochastic depth rate, linear over depth.
        out_indices (int | sequence[int]): Blocks whose patch tokens are
            returned as ``B x C x H/p x W/p`` maps. Negative counts from the
            end. Default: the last block.
        final_norm (bool): Apply the final LayerNorm (``norm``) to the output
            of the last block when it is in ``out_indices``. MAE/ViTDet use
            the raw block output (False); timm's ``forward_features`` applies
            it (True).
        window_size (int): 0 for global attention in every block; otherwise
            the window side (in patches) of ViTDet-style windowed attention
            in blocks not listed in ``global_attn_indexes``. In a windowed
            block every window also attends to the class token and the
            prompts as extra keys and values, and prompt tokens are updated
            only in global blocks.
        global_attn_indexes (sequence[int]): Blocks with global attention
            when ``window_size > 0``.
        frozen (bool): Freeze every backbone weight (patch embedding, position
            embedding, class token, blocks, norm); only prompt parameters
            train, and ``train()`` keeps the frozen parts in eval mode. With
            ``prompt=None`` and ``frozen=False`` this is the full fine-tuning
            baseline.
        with_cp (bool): Gradient checkpointing of the blocks that need
            gradients.
        prompt (dict, optional): ``None`` for a plain ViT, else a dict with
            keys:

            - ``type``: ``'VPTPrompt'``, ``'WhitenedPrompt'`` (with
              ``tunable=False`` for BPT-fWhiten or ``True`` for BPT-tWhiten)
              or ``'BilinearPrompt'`` (with ``rank``), or ``'SPTPrompt'``
              (VPT prompts initialised from data: ``init``, ``source``);
              further keys go to the prompt class (``init_std``,
              ``whitening_init``).
            - ``num_tokens`` (int): prompts per block, ``m``.
            - ``depth``: ``'shallow'`` (default) or ``'deep'``.
            - ``layers``: deep only; the prompted blocks (default: all).
            - ``trainable_projection_layers``: deep only, for prompts with a
              projection; the blocks whose ``W``/``B`` trains (default: the
              top 4 prompted blocks, as in the authors' deep BPT). Other
              blocks keep their initial projection as a buffer while their
              ``P``/``A`` train.
            - ``dropout`` (float): dropout on ``P~`` (default 0).
            - ``allow_identity_whitening`` (bool): train even if whitening
              matrices were never computed (default False: refuse).
        init_cfg (dict, optional): ``dict(type='Pretrained',
            checkpoint=PATH)`` loads a timm/DeiT, MAE, MoCo v3, mmpretrain or
            mmseg ViT checkpoint, detecting its layout. ``PATH`` may also be
            an ``https://`` URL, a model-zoo name or a file-backend name
            (``s3://``...) as mmengine accepts them (see
            :mod:`bpt_mm.models.checkpoint_source`).
        pretrained (str, optional): The same as ``init_cfg`` with that
            checkpoint; mmseg's segmentors pass their ``pretrained`` here.
            A model-zoo CNN (an mmseg base's ``'open-mmlab://resnet50_v1c'``)
            is refused at build.

    Examples:
        >>> import torch
        >>> model = PromptedViT(arch='base', prompt=dict(
        ...     type='BilinearPrompt', rank=75, num_tokens=100))
        >>> sum(p.numel() for p in model.parameters() if p.requires_grad)
        65100
        >>> [f.shape for f in model(torch.rand(1, 3, 64, 96))]
        [torch.Size([1, 768, 4, 6])]
    """

    def __init__(self,
                 arch: Union[str, dict] = 'base',
                 img_size: Union[int, Tuple[int, int]] = 224,
                 patch_size: int = 16,
                 in_channels: int = 3,
                 qkv_bias: bool = True,
                 patch_bias: bool = True,
                 pre_norm: bool = False,
                 layer_scale_init_value: Optional[float] = None,
                 pos_embed_antialias: bool = False,
                 class_token: bool = True,
                 no_embed_class: bool = False,
                 drop_path_rate: float = 0.,
                 out_indices: Union[int, Sequence[int]] = -1,
                 final_norm: bool = False,
                 window_size: int = 0,
                 global_attn_indexes: Sequence[int] = (),
                 frozen: bool = True,
                 with_cp: bool = False,
                 prompt: Optional[dict] = None,
                 init_cfg: Optional[dict] = None,
                 pretrained: Optional[str] = None) -> None:
        if pretrained is not None:
            # mmseg's EncoderDecoder hands its `pretrained` to the backbone.
            _check_forwarded_pretrained(pretrained, init_cfg)
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        settings = _parse_arch(arch)
        self.embed_dims = settings['embed_dims']
        self.num_layers = settings['num_layers']
        self.num_heads = settings['num_heads']
        check_positive_int(patch_size, 'patch_size')
        check_positive_int(in_channels, 'in_channels')
        _check_img_size(img_size)
        sides = img_size if isinstance(img_size, (list, tuple)) else (
            img_size, img_size)
        if min(sides) < patch_size:
            raise ValueError(
                f'`patch_size` ({patch_size}) is larger than `img_size` '
                f'({img_size!r}): the position-embedding grid would have no '
                f'patch; use a patch_size of at most {min(sides)} or a '
                f'larger img_size')
        for key, value in (('frozen', frozen), ('with_cp', with_cp),
                           ('final_norm', final_norm), ('qkv_bias', qkv_bias),
                           ('class_token', class_token),
                           ('no_embed_class', no_embed_class),
                           ('patch_bias', patch_bias), ('pre_norm', pre_norm),
                           ('pos_embed_antialias', pos_embed_antialias)):
            _check_bool(value, key)
        if isinstance(drop_path_rate, bool) or not isinstance(
                drop_path_rate, (int, float)):
            raise TypeError(f'`drop_path_rate` must be a float in [0, 1), '
                            f'got {drop_path_rate!r}')
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f'`drop_path_rate` must be in [0, 1), got '
                             f'{drop_path_rate!r}')
        if isinstance(window_size, bool) or not isinstance(window_size, int) \
                or window_size < 0:
            raise ValueError(f'`window_size` must be an int >= 0, got '
                             f'{window_size!r}')
        self.patch_size = patch_size
        self.out_indices = _normalise_indices(out_indices, self.num_layers,
                                              'out_indices')
        self.final_norm = final_norm
        self.window_size = window_size
        self.global_attn_indexes = (
            _normalise_indices(tuple(global_attn_indexes), self.num_layers,
                               'global_attn_indexes')
            if global_attn_indexes else ())
        if global_attn_indexes and not window_size:
            raise ValueError('`global_attn_indexes` is only meaningful with '
                             '`window_size > 0`')
        self.frozen = frozen
        self.with_cp = with_cp
        self.layer_scale_init_value = _check_layer_scale(
            layer_scale_init_value)
        self.pos_embed_antialias = pos_embed_antialias

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_channels,
            embed_dim=self.embed_dims, flatten=False, strict_img_size=False,
            bias=patch_bias)
        self.pretrain_grid = tuple(self.patch_embed.grid_size)
        self.num_prefix_tokens = 1 if class_token else 0
        self.cls_token = nn.Parameter(torch.zeros(
            1, 1, self.embed_dims)) if class_token else None
        # Read by the checkpoint loader (as on timm's model): how many rows
        # of pos_embed precede the grid.
        self.no_embed_class = no_embed_class
        self.num_pos_prefix = 0 if no_embed_class else self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(
            1, self.num_pos_prefix + self.patch_embed.num_patches,
            self.embed_dims))
        # Linear stochastic-depth schedule (plain floats: works on the meta
        # device).
        dpr = [drop_path_rate * i / max(self.num_layers - 1, 1)
               for i in range(self.num_layers)]
        self.blocks = nn.ModuleList([
            Block(dim=self.embed_dims, num_heads=self.num_heads,
                  mlp_ratio=settings['mlp_ratio'], qkv_bias=qkv_bias,
                  drop_path=dpr[i], norm_layer=LayerNorm,
                  init_values=self.layer_scale_init_value)
            for i in range(self.num_layers)
        ])
        self.norm_pre = LayerNorm(self.embed_dims) if pre_norm \
            else nn.Identity()
        self.norm = LayerNorm(self.embed_dims)
        self._init_backbone_weights()

        #: The validated prompt config (None without prompts): what the
        #: backbone reads.
        self.prompt_config = None if prompt is None else \
            PromptConfig.from_dict(prompt, self.num_layers)
        #: Its flat dict form, for users and reports; never read in here.
        self.prompt_cfg = None if prompt is None else \
            self.prompt_config.as_dict()
        self.prompts = nn.ModuleDict()
        self.prompt_dropout = nn.Identity()
        if self.prompt_config is not None:
            self._build_prompts()
        if frozen:
            self._freeze_backbone()
        self._whitening_confirmed = False
        #: Set by :meth:`init_weights` once the pretrained weights are in.
        self.pretrained_loaded = False
        # SHA-256 of the frozen weights, saved as extra state (see
        # bpt_mm.models.frozen_state): set when they are loaded from the
        # pretrained file or from a state dict that records it.
        self._frozen_sha256: Optional[str] = None
        # True while init_weights loads the pretrained file, whose state
        # dict must not be completed from that same file.
        self._loading_pretrained = False
        # The file load_pretrained_file read (init_cfg's, or the one a
        # trainable-only checkpoint recorded).
        self._pretrained_source: Optional[str] = None
        # Deep prompts' keys/values at inference (see _cached_prompt_kv);
        # not state: never saved, rebuilt on demand.
        self._prompt_kv_cache: Dict[int, tuple] = {}
        # Frozen position embeddings resampled per grid size; not state.
        self._pos_embed_cache: Dict[Tuple[int, int, bool], tuple] = {}

    # ------------------------------------------------------------------ set-up
    def _init_backbone_weights(self) -> None:
        """timm-style random init, for models trained from scratch/tests."""
        trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _build_prompts(self) -> None:
        config = self.prompt_config
        for layer in config.layers:
            self.prompts[str(layer)] = build_prompt(
                config.prompt_class, config.options,
                num_tokens=config.num_tokens, embed_dims=self.embed_dims,
                patch_size=self.patch_size,
                trainable_projection=layer in
                config.trainable_projection_layers)
        if config.dropout > 0:
            self.prompt_dropout = nn.Dropout(config.dropout)

    def _freeze_backbone(self) -> None:
        for name, param in self.named_parameters():
            if not name.startswith('prompts.'):
                param.requires_grad_(False)

    def backbone_modules(self) -> List[nn.Module]:
        """The pretrained parts (everything but the prompts)."""
        return [self.patch_embed, self.norm_pre, self.blocks, self.norm]

    def train(self, mode: bool = True) -> 'PromptedViT':
        super().train(mode)
        if self.frozen:
            # Frozen weights stay in eval mode: no drop path / dropout noise
            # in a backbone that does not learn.
            for module in self.backbone_modules():
                module.eval()
        return self

    # -------------------------------------------------------------- weights
    def init_weights(self) -> None:
        """Load ``init_cfg=dict(type='Pretrained', checkpoint=...)``.

        Foreign layouts are detected and converted; prompt parameters, which
        no pretrained checkpoint has, keep their initialisation.
        """
        if (isinstance(self.init_cfg, dict)
                and self.init_cfg.get('type') == 'Pretrained'):
            unknown = set(self.init_cfg) - {'type', 'checkpoint'}
            if unknown:
                raise ValueError(f'`init_cfg` of PromptedViT accepts keys '
                                 f"['type', 'checkpoint'], got unknown "
                                 f'{sorted(unknown)}')
            if 'checkpoint' not in self.init_cfg:
                raise ValueError("`init_cfg=dict(type='Pretrained')` needs "
                                 '`checkpoint`: the path of the weights')
            checkpoint = self.init_cfg['checkpoint']
            if not isinstance(checkpoint, (str, os.PathLike)):
                raise TypeError(
                    '`init_cfg.checkpoint` of PromptedViT must be a path, '
                    'URL or model-zoo name (str), got '
                    f'{checkpoint!r} ({type(checkpoint).__name__})')
            self.load_pretrained_file(checkpoint)
            self._is_init = True
            return
        super().init_weights()

    def load_pretrained_file(self, checkpoint: str) -> None:
        """Load pretrained ViT weights (any known layout; a local path, URL
        or model-zoo name) and hash the frozen ones.

        Args:
            checkpoint (str): The file, as ``init_cfg`` would name it.
        """
        from .checkpoint import load_pretrained
        from .checkpoint_source import local_checkpoint
        self._loading_pretrained = True
        try:
            with local_checkpoint(checkpoint) as path:
                info = load_pretrained(self, path,
                                       logger=MMLogger.get_current_instance(),
                                       name=checkpoint)
        finally:
            self._loading_pretrained = False
        self._check_nothing_used_is_missing(info['missing'], checkpoint)
        self.pretrained_loaded = True
        self._pretrained_source = checkpoint
        # Hashed once here (frozen weights never change) so that every
        # checkpoint records which backbone it was trained on.
        self._frozen_sha256 = None
        if self.frozen:
            self._frozen_sha256 = self.frozen_fingerprint()

    def _check_nothing_used_is_missing(self, missing: Sequence[str],
                                       path: str) -> None:
        """Refuse a pretrained load that left weights of the forward at
        their random initialisation.

        ``load_pretrained`` only reports missing keys, as it serves any
        timm-named module; for this backbone a missing block, patch
        embedding or position embedding would be a random (and, when
        ``frozen``, never trained) part of a model that reads as
        "loaded". The final ``norm`` is the one exception: it is used
        only with ``final_norm=True`` and the last block in
        ``out_indices``, and MAE/mmseg checkpoints without it are loaded
        with ``final_norm=False``.

        Args:
            missing (Sequence[str]): Model keys the file lacks (prompt keys
                excluded), from :func:`load_pretrained`.
            path (str): The checkpoint, for the message.

        Raises:
            CheckpointError: Some used weight is missing; the message names
                the keys and the options to check.
        """
        from .checkpoint import CheckpointError
        norm_used = self.final_norm and \
            self.out_indices[-1] == self.num_layers - 1
        used = [k for k in missing
                if norm_used or not k.startswith('norm.')]
        if not used:
            return
        shown = ', '.join(used[:12]) + (
            f', ... (+{len(used) - 12})' if len(used) > 12 else '')
        hints = []
        blocks = sorted({int(k.split('.')[1]) for k in used
                         if k.startswith('blocks.')})
        if blocks:
            hints.append(f'The file has no weights for block(s) {blocks}: '
                         f'is `arch` (num_layers={self.num_layers}) the '
                         f'checkpoint\'s depth?')
        if any(k.startswith('norm.') for k in used):
            hints.append('The file has no final norm: set '
                         '`final_norm=False`.')
        raise CheckpointError(
            f'checkpoint {path!r} leaves {len(used)} weight(s) of the '
            f'backbone at their random initialisation: {shown}. '
            + ' '.join(hints)
            + (' ' if hints else '') + 'Refusing to build a backbone '
            'that only looks pretrained.')

    @property
    def pretrained_checkpoint(self) -> Optional[str]:
        """The checkpoint ``init_cfg`` names, or None for a random backbone."""
        if (isinstance(self.init_cfg, dict)
                and self.init_cfg.get('type') == 'Pretrained'):
            return self.init_cfg.get('checkpoint')
        return None

    def frozen_state_keys(self) -> List[str]:
        """State-dict keys that come from the pretrained checkpoint and never
        train: every key outside ``prompts.`` when ``frozen``, else none."""
        if not self.frozen:
            return []
        return [k for k in self.state_dict()
                if not k.startswith('prompts.') and k != EXTRA_STATE_KEY]

    def frozen_fingerprint(self) -> str:
        """SHA-256 of the frozen weights as they are now
        (:meth:`frozen_state_keys`, in state-dict order)."""
        return frozen_fingerprint(self, self.frozen_state_keys())

    def get_extra_state(self) -> Tensor:
        """Which pretrained file the frozen weights came from and their
        SHA-256 (None when unknown or not frozen), saved with the weights
        as ``_extra_state`` (see :func:`frozen_extra_state`)."""
        return frozen_extra_state(
            self._pretrained_source or self.pretrained_checkpoint,
            self._frozen_sha256 if self.frozen else None)

    def set_extra_state(self, state: Tensor) -> None:
        """Checked only: the record describes the saved weights, which
        :meth:`_load_from_state_dict` compares when it completes them."""
        parse_extra_state(state, EXTRA_STATE_KEY)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata,
                              strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A state dict without the frozen weights (a trainable-only
        # checkpoint) is completed from the pretrained file or refused,
        # whoever loads it: a non-strict load would otherwise keep random
        # weights with nothing but a missing-key warning.
        if not self._loading_pretrained:
            complete_frozen_state(self, state_dict, prefix)
        has_record = prefix + EXTRA_STATE_KEY in state_dict
        if any(prefix + k in state_dict for k in self.frozen_state_keys()):
            # Other frozen weights than the pretrained file's: the record
            # is what the state dict says about them, if anything.
            record = parse_extra_state(
                state_dict.get(prefix + EXTRA_STATE_KEY), EXTRA_STATE_KEY)
            self._frozen_sha256 = record['frozen_sha256']
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not has_record and prefix + EXTRA_STATE_KEY in missing_keys:
            # Pretrained files and checkpoints of earlier versions have no
            # record; nothing is lost without one.
            missing_keys.remove(prefix + EXTRA_STATE_KEY)

    def get_layer_depth(self, param_name: str,
                        prefix: str = '') -> Tuple[int, int]:
        """Depth of a parameter for layer-wise learning-rate decay.

        Patch embedding, class token, position embedding and the pre-norm
        are depth 0,
        block ``i`` and the prompts entering it are ``i + 1``, and
        everything else (final norm, anything outside the backbone) is
        ``num_layers + 1``.

        Args:
            param_name (str): Parameter name, e.g.
                ``'backbone.blocks.3.attn.qkv.weight'``.
            prefix (str): Prefix of the backbone's parameters, e.g.
                ``'backbone.'``.

        Returns:
            tuple[int, int]: The depth and the number of depths
            (``num_layers + 2``).
        """
        total = self.num_layers + 2
        if not param_name.startswith(prefix):
            return total - 1, total
        name = param_name[len(prefix):]
        if name in ('cls_token', 'pos_embed') or name.startswith(
                ('patch_embed', 'norm_pre')):
            return 0, total
        if name.startswith('blocks.') or name.startswith('prompts.'):
            return int(name.split('.')[1]) + 1, total
        return total - 1, total

    # ------------------------------------------------------------- forward
    def prompt_tokens(self, layer: int) -> Optional[Tensor]:
        """``P~`` (m x d) of the prompts entering block ``layer``, or None."""
        module = self.prompts[str(layer)] if str(layer) in self.prompts \
            else None
        return None if module is None else self.prompt_dropout(module())

    def prompt_modules(self) -> Dict[int, BasePrompt]:
        """The prompt module of each prompted block, keyed by block index."""
        return {int(k): v for k, v in self.prompts.items()}

    def _check_whitening(self) -> None:
        if self._whitening_confirmed or not self.prompts:
            return
        missing = [int(k) for k, p in self.prompts.items()
                   if not p.is_whitened]
        if not missing:
            self._whitening_confirmed = True
            return
        if self.prompt_config.allow_identity_whitening:
            return
        spt = self.prompts[str(missing[0])].needs_prototypes
        what, start = ('prototypes of training tokens (SPT)',
                       'random initial prompts') if spt else \
            ('whitening statistics', 'identity')
        raise WhiteningNotReadyError(
            f'PromptedViT: the {self.prompt_config.type} prompts of blocks '
            f'{missing} need {what}, which were never computed. '
            f"Add custom_hooks=[dict(type='BPTWhiteningHook', "
            f'num_images=100)] to the config (it fills them before the first '
            f'iteration), load a checkpoint that holds them, or set '
            f'prompt.allow_identity_whitening=True to train with the '
            f'{start}.')

    def _embed(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """Patch-embed, add position embeddings and the class token, apply
        the pre-norm (if any)."""
        p = self.patch_size
        H, W = x.shape[-2:]
        pad_h, pad_w = (p - H % p) % p, (p - W % p) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.patch_embed(x)  # B, C, h, w
        B, C, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        pos = self.pos_embed
        if (h, w) != self.pretrain_grid:
            pos = self._resampled_pos_embed(h, w)
        if self.no_embed_class:
            # DeiT III: positions for the patches only, class token after.
            x = x + pos
            if self.cls_token is not None:
                x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
            return self.norm_pre(x), (h, w)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        return self.norm_pre(x + pos), (h, w)

    def _resampled_pos_embed(self, h: int, w: int) -> Tensor:
        """The position embeddings resampled to an ``h x w`` grid.

        A frozen table is resampled once per grid size and reused until it
        changes (the staleness rules of :meth:`_cached_prompt_kv`): the
        bicubic resampling is a fixed cost of every forward otherwise.
        """
        pos = self.pos_embed
        cacheable = not pos.requires_grad and \
            not torch.is_inference_mode_enabled()
        key = _tensors_state([pos])
        # The resampling mode is part of the key: it is a plain attribute.
        entry = (h, w, self.pos_embed_antialias)
        hit = self._pos_embed_cache.get(entry) if cacheable else None
        if hit is not None and hit[0] == key:
            return hit[1]
        resampled = resample_pos_embed(
            pos, (h, w), num_prefix_tokens=self.num_pos_prefix,
            old_grid=self.pretrain_grid, antialias=self.pos_embed_antialias)
        if cacheable:
            if len(self._pos_embed_cache) >= 4:  # a few input sizes at most
                self._pos_embed_cache.pop(next(iter(self._pos_embed_cache)))
            self._pos_embed_cache[entry] = (key, resampled)
        return resampled

    def _block_needs_grad(self, index: int) -> bool:
        """Whether block ``index`` must be recorded by autograd.

        A frozen block needs autograd only if something trainable flows
        into it: shallow prompts (every block) or a deep prompt at this or
        an earlier block.
        """
        if not self.frozen:
            return True
        if not self.prompts:
            return False
        return index >= self.prompt_config.layers[0]

    def iter_blocks(self, x: Tensor, last: Optional[int] = None
                    ) -> Iterator[Tuple[int, Tensor, Tensor, Tuple[int, int]]]:
        """Run the ViT block by block.

        Yields, for each block ``i``, ``(i, tokens_in, tokens_out, (h, w))``
        where ``tokens_*`` are ``(B, L, C)`` with the layout
        ``[CLS, shallow prompts, patches]`` (deep prompts are never part of
        the sequence). Used by :meth:`forward` and by tools that need the
        tokens entering each block (whitening, analysis).

        Args:
            x (Tensor): Images ``(B, 3, H, W)``.
            last (int, optional): The last block whose output is used. No
                block above it runs, and in it the prefix tokens (class
                token, shallow prompts) only give keys and values: their
                rows of its ``tokens_out`` are its inputs. ``None``: every
                block, every row computed.
        """
        if self.training and self.prompts:
            self._check_whitening()
        grad_enabled = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad_enabled and
                                    self._block_needs_grad(0)):
            x, hw = self._embed(x)
        # Whether the patch tokens reach anything trainable upstream.
        patches_trainable = x.requires_grad
        deep = self.prompt_config is not None and \
            self.prompt_config.depth == 'deep'
        num_prefix = self.num_prefix_tokens
        if self.prompts and not deep:
            prompt = self.prompt_tokens(0).unsqueeze(0)
            x = torch.cat([x[:, :num_prefix],
                           prompt.expand(x.shape[0], -1, -1),
                           x[:, num_prefix:]], dim=1)
            num_prefix += prompt.shape[1]
        inference = not grad_enabled and not self.training
        for i, block in enumerate(self.blocks):
            kv = prompt_kv = None
            if deep and str(i) in self.prompts:
                if inference:
                    prompt_kv = self._cached_prompt_kv(i, block)
                else:
                    kv = self.prompt_tokens(i).unsqueeze(0)
            window = 0 if (not self.window_size
                           or i in self.global_attn_indexes) \
                else self.window_size
            needs_grad = grad_enabled and self._block_needs_grad(i)
            options = dict(
                prefix_kv_only=i == last,
                # The first block after shallow prompts enter a frozen ViT:
                # the patch rows carry no gradient into it.
                frozen_patches=(i == 0 and needs_grad and self.prompts
                                and not deep and not patches_trainable
                                and not any(p.requires_grad
                                            for p in block.parameters())))
            with torch.set_grad_enabled(needs_grad):
                if self.with_cp and needs_grad and self.training:
                    out = checkpoint(prompted_block_forward, block, x, kv,
                                     window, num_prefix, hw,
                                     use_reentrant=False, **options)
                else:
                    out = prompted_block_forward(block, x, kv, window,
                                                 num_prefix, hw, prompt_kv,
                                                 **options)
            yield i, x, out, hw
            if i == last:
                return
            x = out

    def block_tokens(self, x: Tensor, blocks: Sequence[int],
                     tokens: str = TOKEN_SETS[0],
                     source: str = TOKEN_SOURCES[0]) -> Dict[int, Tensor]:
        """The tokens entering each of ``blocks`` (the token tap).

        Runs ``x`` through :meth:`iter_blocks` up to the highest of
        ``blocks`` (not beyond) and selects, per block, the tokens entering
        it. Gradients follow the caller's grad mode and the backbone's own
        rules (the whitening statistics run under ``torch.no_grad()``).

        Args:
            x (Tensor): Preprocessed images ``(B, C, H, W)``.
            blocks (Sequence[int]): Block indices in ``[0, num_layers)``.
            tokens (str): ``'patch'`` (default: patches only) or ``'all'``
                (class token and patches); prompts never count.
            source (str): ``'block_input'`` (default: the tokens entering
                the block) or ``'norm1'`` (after the block's ``norm1``).

        Returns:
            dict[int, Tensor]: ``(B, n, d)`` tokens per block.
        """
        if tokens not in TOKEN_SETS or source not in TOKEN_SOURCES:
            raise ValueError("`tokens` must be 'patch' or 'all' and `source`"
                             " 'block_input' or 'norm1', got "
                             f'{tokens!r} and {source!r}')
        return self.tap_tokens(x, blocks, tokens, source)

    def tap_tokens(self, x: Tensor, blocks: Sequence[int], tokens: str,
                   source: str) -> Dict[int, Tensor]:
        """:meth:`block_tokens` for a ``tokens`` and ``source`` already
        checked (one of :data:`TOKEN_SETS` and :data:`TOKEN_SOURCES`), as
        those of a :class:`~bpt_mm.whitening.options.WhiteningOptions`
        are: the whitening collector's path checks them once, there.
        ``blocks`` is checked here.

        Args:
            x (Tensor): Preprocessed images ``(B, C, H, W)``.
            blocks (Sequence[int]): Block indices in ``[0, num_layers)``.
            tokens (str): One of :data:`TOKEN_SETS`.
            source (str): One of :data:`TOKEN_SOURCES`.

        Returns:
            dict[int, Tensor]: ``(B, n, d)`` tokens per block.
        """
        wanted = sorted(set(blocks))
        if not wanted:
            return {}
        bad = [i for i in wanted if isinstance(i, bool)
               or not isinstance(i, int) or not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f'blocks {bad} are not block indices of this '
                             f'{self.num_layers}-block backbone (allowed: '
                             f'0 to {self.num_layers - 1})')
        num_cls = self.num_prefix_tokens
        start = self.num_sequence_prefix_tokens
        out: Dict[int, Tensor] = {}
        steps = self.iter_blocks(x)
        try:
            for index, tokens_in, _, _ in steps:
                if index in wanted:
                    # [CLS, shallow prompts, patches]: prompts never count.
                    selected = tokens_in[:, start:]
                    if tokens == 'all' and num_cls:
                        selected = torch.cat([tokens_in[:, :num_cls],
                                              selected], dim=1)
                    if source == 'norm1':
                        # per token: selecting first is exact
                        selected = self.blocks[index].norm1(selected)
                    out[index] = selected
                if index == wanted[-1]:
                    break
        finally:
            steps.close()  # do not run the blocks above
        return out

    def _cached_prompt_kv(self, index: int, block: nn.Module):
        """Keys and values of block ``index``'s deep prompts, at inference.

        They depend on the prompt parameters, the block's ``norm1``,
        ``qkv`` and key-norm weights only, not on the image, so they are
        computed once and reused until one of those tensors changes (see
        :func:`_tensors_state`).
        """
        tensors = [*self.prompts[str(index)].parameters(),
                   *self.prompts[str(index)].buffers(),
                   *block.norm1.parameters(), *block.attn.qkv.parameters(),
                   *block.attn.k_norm.parameters()]
        key = _tensors_state(tensors)
        hit = self._prompt_kv_cache.get(index)
        if hit is not None and hit[0] == key:
            return hit[1]
        kv = block_prompt_keys_values(block,
                                      self.prompt_tokens(index).unsqueeze(0))
        self._prompt_kv_cache[index] = (key, kv)
        return kv

    @property
    def num_sequence_prefix_tokens(self) -> int:
        """Leading non-patch tokens of the sequence between blocks."""
        shallow = self.prompt_config is not None and \
            self.prompt_config.depth == 'shallow'
        return self.num_prefix_tokens + (self.prompt_config.num_tokens
                                         if shallow else 0)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Return one ``(B, C, h, w)`` map per entry of ``out_indices``."""
        outs = []
        num_prefix = self.num_sequence_prefix_tokens
        last = self.num_layers - 1
        for i, _, tokens, (h, w) in self.iter_blocks(
                x, last=self.out_indices[-1]):
            if i in self.out_indices:
                patches = tokens[:, num_prefix:]
                if self.final_norm and i == last:
                    patches = self.norm(patches)
                B, _, C = patches.shape
                outs.append(patches.transpose(1, 2).reshape(B, C, h, w))
        return tuple(outs)


def _tensors_state(tensors) -> tuple:
    """A key that changes whenever one of ``tensors`` may have changed:
    an optimizer step or ``load_state_dict`` bumps a tensor's version
    counter, ``.to()`` or a reassignment changes its storage. The caches of
    values derived from frozen or prompt tensors compare it."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device)
                 for t in tensors)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP/FSDP wrapper or a test-time-augmentation
    model (``--tta``), or the model itself."""
    if is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        return model.module
    return model


def find_prompted_backbone(model: nn.Module) -> Optional[PromptedViT]:
    """``model`` if it is a PromptedViT, else ``model.backbone`` if that is
    (DDP wrappers are looked through)."""
    model = unwrap_model(model)
    if isinstance(model, PromptedViT):
        return model
    backbone = getattr(model, 'backbone', None)
    return backbone if isinstance(backbone, PromptedViT) else None
