"""A CPU fast path for the coupling network: the same function, other kernels.

The coupling network is ``3x3 conv (C -> F), ReLU, 1x1 conv (F -> F), ReLU, 3x3 conv
(F -> O), times exp(LOG_SCALE_FACTOR * g)``. At the first levels of a Glow on small images
``C`` and ``O`` are a handful of channels (2 and 4 for 1x32x32 at 16x16), where oneDNN's 3x3
kernels for thin shapes run at a fifth of its matrix-multiply rate. Here every layer is a
matrix multiply over the pixels' rows (channels_last, ``N = B H W`` rows):

- the thin-input 3x3 convolution multiplies each pixel's ``9 C`` neighbours (im2col, a
  small copy for thin inputs) by ``[9 C, F]``; its input gradient multiplies the hidden
  gradient by ``[F, 9 C]`` and adds the nine ``C``-blocks back at their pixels (col2im);
- the 1x1 convolution is a ``[F, F]`` product; both ReLUs are fused into their products'
  forward (oneDNN's linear with a ReLU post-op);
- the thin-output 3x3 convolution multiplies each pixel's ``F`` features by ``[F, 9 O]``
  (one ``O``-block per tap) and adds the nine blocks at their shifted pixels;
- the backward runs over blocks of ``BLOCK_ROWS`` rows: each block's hidden gradients go
  from the third layer to the first (ReLU masks applied in place) while they are in cache,
  and every weight gradient is accumulated block by block. The two ``[N, F]`` hidden
  gradients are never whole in memory, where a layer-by-layer backward writes and reads
  each of them (8 MB apiece at batch 64) several times.

The whole network is one autograd node with a hand-written backward. The math is unchanged:
outputs and gradients equal the plain ``Sequential``'s to float32 rounding (tests compare
both, and check the backward by ``gradcheck`` in float64). docs/benchmarks.md has what it
buys, and where it does not pay (see :func:`applies`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# The fast path pays where the network's input is thin and its products big: it serves
# inputs of at most MAX_CHANNELS channels where pixels (over the batch) times hidden channels
# reach MIN_WORK, in networks of at least MIN_HIDDEN hidden channels. Measured in training
# steps (docs/benchmarks.md, session 6): a Glow's first two levels on gray images at 128
# channels (16,384 and 4,096 pixels) and its first at 48 (16,384) gain; the second level at
# 48 channels (4,096 pixels, below MIN_WORK: 0.97x) and an RGB image's 6-channel first level
# (0.98x) do not.
MAX_CHANNELS = 4
MIN_WORK = 2**19
MIN_HIDDEN = 48
CHANNELS_LAST = torch.channels_last
# The backward's blocks of pixels: 4,096 rows of 128 features are 2 MB, a core's L2 cache
# (measured in training steps: 2,048, 8,192 and 16,384 rows were about 3% slower).
BLOCK_ROWS = 4096
# oneDNN's matrix multiply with a ReLU post-op (a private op of torch's CPU builds; without
# it the product and the ReLU run one after the other).
_FUSED_RELU = hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ONEDNN = torch.backends.mkldnn.is_available()
# Offsets (di, dj) of the nine taps of a 3x3 kernel, in the kernel's row-major order.
TAPS = [(i - 1, j - 1) for i in range(3) for j in range(3)]


def applies(x: Tensor, hidden: int) -> bool:
    """Whether :class:`FusedCouplingNetwork` serves ``x`` for a network of ``hidden`` channels:
    float32 on the CPU with oneDNN, a thin input (``MAX_CHANNELS``), enough products
    (``MIN_WORK``) and a wide enough network (``MIN_HIDDEN``). It runs in channels_last
    whatever the layout of ``x``: a thin input costs little to copy."""
    if x.dim() != 4 or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    batch, channels, height, width = x.shape
    return (
        channels <= MAX_CHANNELS
        and batch * height * width * hidden >= MIN_WORK
        and hidden >= MIN_HIDDEN
        and _ONEDNN
    )


def _span(offset: int, size: int) -> tuple[slice, slice]:
    """The slices ``(to, from)`` along one axis with ``to + offset = from`` inside ``size``."""
    return (slice(max(0, -offset), size - max(0, offset)),
            slice(max(0, offset), size - max(0, -offset)))


def _sum_taps(taps: Tensor, sign: int) -> Tensor:
    """``out[p] = sum_t taps[p + sign * d_t, t]``, zero outside the image.

    ``taps`` is ``[B, H, W, 9, K]`` (pixels in row-major order, channels last); the result
    is ``[B, H, W, K]``. ``sign = 1`` is the forward of a 'same' 3x3 convolution given each
    pixel's nine tap products; ``sign = -1`` is the col2im of its input gradient.
    """
    out = taps[:, :, :, 4].clone()
    height, width = taps.shape[1], taps.shape[2]
    for t, (di, dj) in enumerate(TAPS):
        if t == 4:
            continue
        (rows_to, rows_from), (cols_to, cols_from) = (_span(sign * di, height),
                                                      _span(sign * dj, width))
        out[:, rows_to, cols_to] += taps[:, rows_from, cols_from, t]
    return out


def _spread_taps(grad: Tensor) -> Tensor:
    """The adjoint of ``_sum_taps(., 1)``: ``taps[q, t] = grad[q - d_t]``, ``[B, H, W, 9, K]``
    from ``[B, H, W, K]``."""
    batch, height, width, channels = grad.shape
    taps = grad.new_zeros(batch, height, width, 9, channels)
    for t, (di, dj) in enumerate(TAPS):
        (rows_to, rows_from), (cols_to, cols_from) = _span(di, height), _span(dj, width)
        taps[:, rows_from, cols_from, t] = grad[:, rows_to, cols_to]
    return taps


def _pixels(x: Tensor) -> Tensor:
    """A channels_last ``[B, C, H, W]`` as its ``[B, H, W, C]`` view."""
    return x.contiguous(memory_format=CHANNELS_LAST).permute(0, 2, 3, 1)


def _as_maps(x: Tensor) -> Tensor:
    """``[B, H, W, C]`` (contiguous) as the channels_last ``[B, C, H, W]`` it is."""
    return x.permute(0, 3, 1, 2)


def _im2col(x: Tensor) -> Tensor:
    """The 3x3 neighbourhoods of a 'same' convolution, ``[B H W, 9 C]``: column ``t C + c``
    of pixel ``p``'s row holds channel ``c`` at ``p + d_t`` (zero outside the image)."""
    batch, channels, height, width = x.shape
    padded = F.pad(_pixels(x), (0, 0, 1, 1, 1, 1)).contiguous()
    image, row, column, channel = padded.stride()
    patches = padded.as_strided((batch, height, width, 3, 3, channels),
                                (image, row, column, row, column, channel))
    return patches.reshape(-1, 9 * channels)


def _linear_relu(rows: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``relu(rows @ weight.T + bias)``, the ReLU fused into oneDNN's product in float32."""
    if rows.dtype == torch.float32 and _FUSED_RELU:
        return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "relu", [], "")
    return torch.addmm(bias, rows, weight.T).relu_()


def _relu_backward_(grad: Tensor, output: Tensor) -> Tensor:
    """``grad`` zeroed where the ReLU's ``output`` is, in place (no new buffer)."""
    return torch.ops.aten.threshold_backward.grad_input(grad, output, 0, grad_input=grad)


class FusedCouplingNetwork(torch.autograd.Function):
    """``apply(x, w1, b1, w2, b2, w3, b3, raw_log_gain, factor)``: the coupling network of
    :func:`~tzkcli.flows.layers.coupling_network` on ``x`` (``[B, C, H, W]``, any layout),
    its output scaled by ``exp(factor * raw_log_gain)``; the output is channels_last.

    Works in float32 (oneDNN's fused ReLU) and in float64 (plain products, for tests); no
    double backward. Saves the two hidden activations (``[B H W, F]`` each) and the input's
    im2col (``[B H W, 9 C]``) for the backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor,
                b3: Tensor, raw_log_gain: Tensor, factor: float) -> Tensor:
        batch, channels, height, width = x.shape
        hidden, outputs = w1.shape[0], w3.shape[0]
        # [F, 9 C]: column t * C + c holds w1[:, c, i, j] for tap t = 3 i + j.
        w1_taps = w1.permute(0, 2, 3, 1).reshape(hidden, 9 * channels)
        # [F, 9 O]: column t * O + o holds w3[o, :, i, j].
        w3_taps = w3.permute(1, 2, 3, 0).reshape(hidden, 9 * outputs)

        cols = _im2col(x)
        h1 = _linear_relu(cols, w1_taps, b1)
        h2 = _linear_relu(h1, w2.view(hidden, hidden), b2)
        products = (h2 @ w3_taps).view(batch, height, width, 9, outputs)
        conv = _sum_taps(products, 1) + b3

        gain = torch.exp(factor * raw_log_gain)
        ctx.save_for_backward(cols, w1_taps, h1, w2, h2, w3_taps, conv, gain)
        ctx.factor = factor
        return _as_maps(conv * gain.view(-1))

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        cols, w1_taps, h1, w2, h2, w3_taps, conv, gain = ctx.saved_tensors
        grad = _pixels(grad_y)

        # y = conv * gain
        grad_gain = ctx.factor * gain * (grad * conv).sum(dim=(0, 1, 2)).view_as(gain)
        grad_conv = grad * gain.view(-1)
        grad_b3 = grad_conv.sum(dim=(0, 1, 2))

        # conv = sum of shifted tap products; then the three products, block by block
        grad_products = _spread_taps(grad_conv).view(h2.shape[0], -1)
        grads = _blocked_backward(grad_products, cols, w1_taps, h1, w2, h2, w3_taps,
                                  ctx.needs_input_grad[0])
        grad_cols_w1, grad_b1, grad_w2, grad_b2, grad_w3_taps, grad_cols = grads

        hidden, outputs, channels = h1.shape[1], gain.numel(), cols.shape[1] // 9
        grad_w1 = grad_cols_w1.view(3, 3, channels, hidden).permute(3, 2, 0, 1)
        grad_w3 = grad_w3_taps.T.reshape(hidden, 3, 3, outputs).permute(3, 0, 1, 2)
        grad_x = None
        if grad_cols is not None:
            taps = grad_cols.view(*grad.shape[:3], 9, channels)
            grad_x = _as_maps(_sum_taps(taps, -1))

        return (grad_x, grad_w1, grad_b1, grad_w2.view_as(w2), grad_b2,
                grad_w3.contiguous(memory_format=CHANNELS_LAST), grad_b3, grad_gain, None)


def _blocked_backward(grad_products: Tensor, cols: Tensor, w1_taps: Tensor, h1: Tensor,
                      w2: Tensor, h2: Tensor, w3_taps: Tensor, input_grad: bool
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The gradients of ``w1_taps`` (as ``[9 C, F]``), ``b1``, ``w2`` (as ``[F, F]``), ``b2``,
    ``w3_taps`` (as ``[9 O, F]``) and ``cols`` (``None`` unless ``input_grad``) from those of
    the tap products, over blocks of ``BLOCK_ROWS`` pixels: a block's two hidden gradients
    stay in cache from the products that make them to the products that use them."""
    rows, hidden = h1.shape
    block = min(BLOCK_ROWS, rows)
    w2 = w2.view(hidden, hidden)
    grad_cols_w1 = h1.new_zeros(cols.shape[1], hidden)
    grad_w2 = h1.new_zeros(hidden, hidden)
    grad_w3_taps = h1.new_zeros(grad_products.shape[1], hidden)
    grad_b1, grad_b2 = h1.new_zeros(hidden), h1.new_zeros(hidden)
    grad_cols = h1.new_empty(cols.shape) if input_grad else None
    # One buffer per hidden gradient, reused by every block; ones for the bias gradients.
    grad_h1_buffer, grad_h2_buffer = h1.new_empty(block, hidden), h1.new_empty(block, hidden)
    ones = h1.new_ones(block)

    for start in range(0, rows, block):
        pixels = slice(start, start + block)
        n = min(block, rows - start)
        grad_block, h1_block, h2_block = grad_products[pixels], h1[pixels], h2[pixels]

        grad_w3_taps.addmm_(grad_block.T, h2_block)
        grad_h2 = torch.mm(grad_block, w3_taps.T, out=grad_h2_buffer[:n])
        _relu_backward_(grad_h2, h2_block)

        grad_w2.addmm_(grad_h2.T, h1_block)
        grad_b2.addmv_(grad_h2.T, ones[:n])
        grad_h1 = torch.mm(grad_h2, w2, out=grad_h1_buffer[:n])
        _relu_backward_(grad_h1, h1_block)

        # As [9 C, F]: MKL runs this orientation 1.6x to 1.9x as fast as [F, 9 C].
        grad_cols_w1.addmm_(cols[pixels].T, grad_h1)
        grad_b1.addmv_(grad_h1.T, ones[:n])
        if grad_cols is not None:
            torch.mm(grad_h1, w1_taps, out=grad_cols[pixels])

    return grad_cols_w1, grad_b1, grad_w2, grad_b2, grad_w3_taps, grad_cols
