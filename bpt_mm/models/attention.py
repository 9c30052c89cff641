"""Running a timm ViT block with prompt tokens that only give keys and values.

timm's :class:`~timm.models.vision_transformer.Block` is used as it is for its
parameters (so timm checkpoints load without renaming), but its forward is
replaced by :func:`prompted_block_forward`, which adds what timm's block
cannot do:

* ``kv_tokens``: tokens that every query attends to but that produce no output
  of their own. A deep prompt's output is dropped at the next block, so its
  query row, attention output, projection and MLP would be wasted work; it
  only needs keys and values. Softmax over keys does not depend on their
  order, so this is exactly the block applied to ``[x, kv_tokens]`` with the
  prompt outputs thrown away. The same holds for the prefix tokens (class
  token, shallow prompts) in the last block whose output is used
  (``prefix_kv_only``).
* windowed attention in the ViTDet way: patch tokens attend within
  non-overlapping windows (zero-padded to a multiple of the window), and each
  window also attends to the prefix tokens (class token, shallow prompts) and
  to ``kv_tokens``. Prefix tokens are not updated in a windowed block: they
  would have to attend to every window, which is what a global block does.
* ``frozen_patches``: in the first block after shallow prompts enter a frozen
  ViT, the patch tokens depend on nothing trainable. Their queries, keys and
  values then need no gradient, and the patch queries' attention is split
  into a part over the patch keys, computed without autograd, and a
  differentiable part over the prompt keys
  (:func:`attention_frozen_self_keys`), so the backward pass costs O(N·M)
  there instead of O(N·(N+M)).
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


KeysValues = Tuple[Tensor, Tensor]

#: Bytes of float32 attention scores the math fallback of
#: :func:`attention_with_logsumexp` holds at once.
_SCORES_BUDGET = 64 * 2**20


def _project_qkv(attn: torch.nn.Module,
                 tokens: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values of normalised ``tokens`` ``(B, N, C)``, each
    ``(B, heads, N, head_dim)``, with the module's q/k norms applied."""
    B, N, _ = tokens.shape
    qkv = attn.qkv(tokens).reshape(B, N, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def keys_values(attn: torch.nn.Module, tokens: Tensor) -> KeysValues:
    """Keys (after the module's k norm) and values of normalised ``tokens``
    ``(B, M, C)``, each ``(B, heads, M, head_dim)``.

    Only the key/value rows of the ``qkv`` projection are used: a query of
    these tokens would be computed and thrown away.
    """
    heads, head_dim = attn.num_heads, attn.head_dim
    inner = heads * head_dim
    bias = attn.qkv.bias[inner:] if attn.qkv.bias is not None else None
    kv = F.linear(tokens, attn.qkv.weight[inner:], bias)
    B, M, _ = tokens.shape
    kv = kv.reshape(B, M, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    return attn.k_norm(kv[0]), kv[1]


def attention_with_logsumexp(q: Tensor, k: Tensor, v: Tensor,
                             use_fused: bool = True
                             ) -> Tuple[Tensor, Tensor]:
    """Softmax attention and the log of its normaliser, without autograd.

    Args:
        q, k, v (Tensor): ``(B, heads, N, d)``, ``(B, heads, M, d)`` twice.
        use_fused (bool): On the CPU, use torch's fused flash-attention
            kernel, which returns the log-sum-exp; otherwise (and on other
            devices) the scores are formed explicitly, in chunks of queries.

    Returns:
        tuple: the output ``(B, heads, N, d)`` and ``logsumexp(q·kᵀ/√d)``
        over the keys, ``(B, heads, N)`` in float32.
    """
    scale = q.shape[-1] ** -0.5
    fused = getattr(torch.ops.aten,
                    '_scaled_dot_product_flash_attention_for_cpu', None)
    with torch.no_grad():
        if use_fused and fused is not None and q.device.type == 'cpu':
            out, lse = fused(q, k, v, scale=scale)
            return out, lse.float()
        B, heads, N, _ = q.shape
        chunk = max(1, _SCORES_BUDGET // (4 * B * heads * k.shape[2]))
        outs, lses = [], []
        for start in range(0, N, chunk):
            scores = torch.matmul(q[:, :, start:start + chunk],
                                  k.transpose(-2, -1)).float() * scale
            lse = torch.logsumexp(scores, dim=-1)
            probs = torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype)
            outs.append(torch.matmul(probs, v))
            lses.append(lse)
        return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def attention_frozen_self_keys(q: Tensor, k: Tensor, v: Tensor,
                               extra_k: Tensor, extra_v: Tensor,
                               use_fused: bool = True) -> Tensor:
    """``softmax(q·[k; extra_k]ᵀ/√d)·[v; extra_v]`` when only the extra keys
    and values need gradients.

    The attention over ``(k, v)`` is computed without autograd, together
    with its log-normaliser; the differentiable attention over the extra
    keys is merged with it by the usual rescaling of partial softmaxes (as
    split-key flash attention does). Backward then touches only the
    ``N x M`` scores of the extra keys, not the ``N x N`` ones.

    Args:
        q, k, v (Tensor): ``(B, heads, N, d)`` that need no gradient.
        extra_k, extra_v (Tensor): ``(B or 1, heads, M, d)``.
        use_fused (bool): See :func:`attention_with_logsumexp`.

    Returns:
        Tensor: ``(B, heads, N, d)``.
    """
    out_self, lse = attention_with_logsumexp(q, k, v, use_fused)
    lse = lse.unsqueeze(-1)
    logits = torch.matmul(q, extra_k.transpose(-2, -1)).float() \
        * q.shape[-1] ** -0.5
    shift = torch.maximum(lse, logits.detach().amax(dim=-1, keepdim=True))
    weights = torch.exp(logits - shift)
    self_mass = torch.exp(lse - shift)
    out = (self_mass * out_self + torch.matmul(weights.to(extra_v.dtype),
                                               extra_v)) \
        / (self_mass + weights.sum(dim=-1, keepdim=True))
    return out.to(q.dtype)


def _attend(attn: torch.nn.Module, q: Tensor, k: Tensor, v: Tensor,
            extra_kv: Sequence[KeysValues]) -> Tensor:
    """Attention of ``q`` over its own ``k, v`` and ``extra_kv``; returns
    ``(B, N, C)`` before the output projection."""
    B, heads, N, head_dim = q.shape
    extra_k = [ek.expand(B, -1, -1, -1) for ek, _ in extra_kv]
    extra_v = [ev.expand(B, -1, -1, -1) for _, ev in extra_kv]
    dropout = attn.attn_drop.p if attn.training else 0.
    if (extra_kv and dropout == 0. and torch.is_grad_enabled()
            and not (q.requires_grad or k.requires_grad or v.requires_grad)
            and any(t.requires_grad for t in extra_k + extra_v)):
        # Nothing upstream of q, k, v trains: only the extra keys' share of
        # the attention needs a backward pass.
        out = attention_frozen_self_keys(q, k, v, torch.cat(extra_k, dim=2),
                                         torch.cat(extra_v, dim=2))
    else:
        if extra_kv:
            k = torch.cat([k, *extra_k], dim=2)
            v = torch.cat([v, *extra_v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    return out.transpose(1, 2).reshape(B, N, heads * head_dim)


def _project_out(attn: torch.nn.Module, out: Tensor) -> Tensor:
    norm = getattr(attn, 'norm', None)
    if norm is not None:
        out = norm(out)
    return attn.proj_drop(attn.proj(out))


def attention_forward(attn: torch.nn.Module, x: Tensor,
                      extra_kv: Sequence[KeysValues] = ()) -> Tensor:
    """Multi-head self-attention of timm's ``Attention`` with extra keys.

    Args:
        attn: A timm ``Attention`` module (``qkv``, ``proj``, ...).
        x (Tensor): Normalised tokens ``(B, N, C)``; they are the queries and
            also give keys and values.
        extra_kv (sequence of tuples): Further keys and values
            (:func:`keys_values`), each ``(B or 1, heads, M, head_dim)``,
            that every query attends to.

    Returns:
        Tensor: ``(B, N, C)``, the attention output for ``x``.
    """
    return _project_out(attn, _attend(attn, *_project_qkv(attn, x),
                                      extra_kv))


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
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(
        -1, window_size * window_size, C)
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
                           prompt_kv: Optional[KeysValues] = None,
                           prefix_kv_only: bool = False,
                           frozen_patches: bool = False) -> Tensor:
    """Run a timm ViT ``Block`` with optional key/value-only tokens.

    Args:
        block: A timm ``Block`` (``norm1, attn, ls1, drop_path1, norm2, mlp,
            ls2, drop_path2``).
        x (Tensor): ``(B, L, C)``: ``num_prefix_tokens`` prefix tokens (class
            token, shallow prompts) then ``h * w`` patch tokens.
        kv_tokens (Tensor, optional): ``(B or 1, M, C)`` tokens, before the
            block's LayerNorm, that give keys and values only (deep prompts).
        window_size (int): 0 for global attention, else the window side.
        num_prefix_tokens (int): Leading tokens that are not patches.
        grid_hw (tuple): ``(h, w)`` of the patch grid, for windowed blocks.
        prompt_kv (tuple, optional): The keys and values of ``kv_tokens``
            computed beforehand (:func:`block_prompt_keys_values`), used
            instead of ``kv_tokens``; they do not depend on the image, so at
            inference they are computed once.
        prefix_kv_only (bool): The prefix tokens' outputs are not needed
            (nothing reads them after this block): they only give keys and
            values, and are returned unchanged, as in a windowed block.
        frozen_patches (bool): The patch tokens of ``x`` depend on nothing
            trainable (the first block after shallow prompts enter a frozen
            ViT). Their own attention is then computed without autograd;
            only the prefix tokens' share of it is differentiated.

    Returns:
        Tensor: ``(B, L, C)``.
    """
    if prompt_kv is None and kv_tokens is not None:
        prompt_kv = block_prompt_keys_values(block, kv_tokens)
    extra_kv: List[KeysValues] = [prompt_kv] if prompt_kv is not None else []
    attn = block.attn
    n = num_prefix_tokens
    windowed = window_size > 0
    if not windowed and not (n and (prefix_kv_only or frozen_patches)):
        x = x + block.drop_path1(block.ls1(attention_forward(
            attn, block.norm1(x), extra_kv)))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    prefix, patches = x[:, :n], x[:, n:]
    if frozen_patches:
        # Exact: the patch rows reach nothing trainable upstream.
        patches = patches.detach()
    prefix_n, patches_n = block.norm1(prefix), block.norm1(patches)
    if not windowed and not prefix_kv_only:
        # Global block, prefix updated: the prefix queries attend as usual;
        # the patch queries separately, so that with frozen patches their
        # attention over the patch keys needs no backward pass.
        q_p, k_p, v_p = _project_qkv(attn, prefix_n)
        q_x, k_x, v_x = _project_qkv(attn, patches_n)
        out = torch.cat([
            _attend(attn, q_p, k_p, v_p, [(k_x, v_x), *extra_kv]),
            _attend(attn, q_x, k_x, v_x, [(k_p, v_p), *extra_kv])], dim=1)
        x = x + block.drop_path1(block.ls1(_project_out(attn, out)))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    # The prefix tokens only give keys and values, once per image (not per
    # window), and keep their values.
    if n:
        extra_kv.insert(0, keys_values(attn, prefix_n))
    B, _, C = patches.shape
    if windowed:
        h, w = grid_hw
        windows, padded_hw = window_partition(patches_n.view(B, h, w, C),
                                              window_size)
        num_windows = windows.shape[0] // B
        # Every window of an image sees that image's prefix tokens and the
        # prompts (the same for every image and window).
        extra_kv = [tuple(t.repeat_interleave(num_windows, dim=0)
                          if t.shape[0] > 1 else t for t in kv)
                    for kv in extra_kv]
        out = attention_forward(attn, windows, extra_kv)
        out = window_unpartition(out, window_size, padded_hw, grid_hw)
        out = out.reshape(B, h * w, C)
    else:
        out = attention_forward(attn, patches_n, extra_kv)
    patches = patches + block.drop_path1(block.ls1(out))
    patches = patches + block.drop_path2(
        block.ls2(block.mlp(block.norm2(patches))))
    return torch.cat([prefix, patches], dim=1)


def block_prompt_keys_values(block: torch.nn.Module,
                             prompt: Tensor) -> KeysValues:
    """Keys and values of key/value-only prompt tokens ``(1, M, C)``
    (before the block's LayerNorm) in ``block``."""
    return keys_values(block.attn, block.norm1(prompt))
