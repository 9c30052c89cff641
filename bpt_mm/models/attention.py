"""Running a timm ViT block with prompt tokens that only give keys and values.

timm's :class:`~timm.models.vision_transformer.Block` is used as it is for its
parameters (so timm checkpoints load without renaming), but its forward is
replaced by :func:`prompted_block_forward`, which adds two things timm's block
cannot do:

* ``kv_tokens``: tokens that every query attends to but that produce no output
  of their own. A deep prompt's output is dropped at the next block, so its
  query row, attention output, projection and MLP would be wasted work; it
  only needs keys and values. Softmax over keys does not depend on their
  order, so this is exactly the block applied to ``[x, kv_tokens]`` with the
  prompt outputs thrown away.
* windowed attention in the ViTDet way: patch tokens attend within
  non-overlapping windows (zero-padded to a multiple of the window), and each
  window also attends to the prefix tokens (class token, shallow prompts) and
  to ``kv_tokens``. Prefix tokens are not updated in a windowed block: they
  would have to attend to every window, which is what a global block does.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


KeysValues = Tuple[Tensor, Tensor]


def keys_values(attn: torch.nn.Module, tokens: Tensor) -> KeysValues:
    """Keys and values of normalised ``tokens`` ``(B, M, C)``, each
    ``(B, heads, M, head_dim)``.

    Only the key/value rows of the ``qkv`` projection are used: a query of
    these tokens would be computed and thrown away.
    """
    heads, head_dim = attn.num_heads, attn.head_dim
    inner = heads * head_dim
    bias = attn.qkv.bias[inner:] if attn.qkv.bias is not None else None
    kv = F.linear(tokens, attn.qkv.weight[inner:], bias)
    B, M, _ = tokens.shape
    kv = kv.reshape(B, M, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    return kv[0], kv[1]


def attention_forward(attn: torch.nn.Module, x: Tensor,
                      kv_tokens: Optional[Tensor] = None,
                      extra_kv: Optional[KeysValues] = None) -> Tensor:
    """Multi-head self-attention of timm's ``Attention`` with extra keys.

    Args:
        attn: A timm ``Attention`` module (``qkv``, ``proj``, ...).
        x (Tensor): Normalised tokens ``(B, N, C)`` that are queried.
        kv_tokens (Tensor, optional): Normalised tokens ``(B or 1, M, C)``
            that only contribute keys and values.
        extra_kv (tuple, optional): Keys and values computed beforehand
            (:func:`keys_values`), ``(B or 1, heads, M', head_dim)`` each,
            appended after those of ``kv_tokens``.

    Returns:
        Tensor: ``(B, N, C)``, the attention output for ``x``.
    """
    B, N, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    inner = heads * head_dim
    qkv = attn.qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    extras = []
    if kv_tokens is not None:
        extras.append(keys_values(attn, kv_tokens))
    if extra_kv is not None:
        extras.append(extra_kv)
    if extras:
        k = torch.cat([k] + [ek.expand(B, -1, -1, -1) for ek, _ in extras],
                      dim=2)
        v = torch.cat([v] + [ev.expand(B, -1, -1, -1) for _, ev in extras],
                      dim=2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(
        q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.)
    out = out.transpose(1, 2).reshape(B, N, inner)
    norm = getattr(attn, 'norm', None)
    if norm is not None:
        out = norm(out)
    out = attn.proj(out)
    return attn.proj_drop(out)


def window_partition(x: Tensor, window_size: int
                     ) -> Tuple[Tensor, Tuple[int, int]]:
    """Split ``(B, H, W, C)`` into ``(B * nW, ws * ws, C)`` windows.

    The map is zero-padded at the bottom/right to a multiple of the window.
    Returns the windows and the padded size.
    """
    B, H, W, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window_size, window_size, Wp // window_size,
               window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size,
                                                  C)
    return windows, (Hp, Wp)


def window_unpartition(windows: Tensor, window_size: int,
                       padded_hw: Tuple[int, int],
                       hw: Tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`, cropping the padding away."""
    Hp, Wp = padded_hw
    H, W = hw
    C = windows.shape[-1]
    B = windows.shape[0] // ((Hp // window_size) * (Wp // window_size))
    x = windows.view(B, Hp // window_size, Wp // window_size, window_size,
                     window_size, C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    return x[:, :H, :W, :]


def prompted_block_forward(block: torch.nn.Module, x: Tensor,
                           kv_tokens: Optional[Tensor] = None,
                           window_size: int = 0,
                           num_prefix_tokens: int = 0,
                           grid_hw: Optional[Tuple[int, int]] = None,
                           prompt_kv: Optional[KeysValues] = None
                           ) -> Tensor:
    """Run a timm ViT ``Block`` with optional key/value-only tokens.

    Args:
        block: A timm ``Block`` (``norm1, attn, ls1, drop_path1, norm2, mlp,
            ls2, drop_path2``).
        x (Tensor): ``(B, L, C)``: ``num_prefix_tokens`` prefix tokens (class
            token, shallow prompts) then ``h * w`` patch tokens.
        kv_tokens (Tensor, optional): ``(B or 1, M, C)`` tokens, before the
            block's LayerNorm, that give keys and values only (deep prompts).
        window_size (int): 0 for global attention, else the window side.
        num_prefix_tokens (int): Leading tokens that are not patches. Only
            used by windowed blocks.
        grid_hw (tuple): ``(h, w)`` of the patch grid, for windowed blocks.
        prompt_kv (tuple, optional): The keys and values of ``kv_tokens``
            computed beforehand (:func:`block_prompt_keys_values`), used
            instead of ``kv_tokens``; they do not depend on the image, so at
            inference they are computed once.

    Returns:
        Tensor: ``(B, L, C)``.
    """
    if prompt_kv is None and kv_tokens is not None:
        prompt_kv = block_prompt_keys_values(block, kv_tokens)
    if window_size <= 0:
        x = x + block.drop_path1(block.ls1(attention_forward(
            block.attn, block.norm1(x), extra_kv=prompt_kv)))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    B, _, C = patches.shape
    h, w = grid_hw
    windows, padded_hw = window_partition(
        block.norm1(patches).view(B, h, w, C), window_size)
    num_windows = windows.shape[0] // B
    # Every window of an image sees that image's prefix tokens and the
    # prompts (the same for every image and window).
    extra = block.norm1(prefix).repeat_interleave(num_windows, dim=0) \
        if num_prefix_tokens else None
    out = attention_forward(block.attn, windows, extra, prompt_kv)
    out = window_unpartition(out, window_size, padded_hw, (h, w))
    patches = patches + block.drop_path1(block.ls1(out.reshape(B, h * w, C)))
    patches = patches + block.drop_path2(
        block.ls2(block.mlp(block.norm2(patches))))
    return torch.cat([prefix, patches], dim=1)


def block_prompt_keys_values(block: torch.nn.Module,
                             prompt: Tensor) -> KeysValues:
    """Keys and values of key/value-only prompt tokens ``(1, M, C)``
    (before the block's LayerNorm) in ``block``."""
    return keys_values(block.attn, block.norm1(prompt))
