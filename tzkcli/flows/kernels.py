"""A CPU fast path for the coupling network: the same function, other kernels.

The coupling network is ``3x3 conv (C -> F), ReLU, 1x1 conv (F -> F), ReLU, 3x3 conv
(F -> O), times exp(LOG_SCALE_FACTOR * g)``. At the first level of a Glow on small images
``C`` and ``O`` are a handful of channels (2 and 4 for 1x32x32) and the image is 16x16, where
oneDNN's 3x3 kernels for thin shapes run at a fifth of its matrix-multiply rate. Here those
two convolutions become matrix multiplies over every pixel:

- the thin-output 3x3 convolution multiplies each pixel's ``F`` features by a ``[F, 9 O]``
  matrix (one ``O``-block per tap) and adds the nine blocks at their shifted pixels;
- the thin-input 3x3 convolution keeps oneDNN's forward and weight gradient, and computes its
  input gradient as the product of the output gradient with a ``[F, 9 C]`` matrix, the nine
  ``C``-blocks summed at their shifted pixels (col2im);
- the two ReLUs are fused into their convolutions' forward (oneDNN post-ops), and the whole
  network is one autograd node with a hand-written backward.

The math is unchanged: outputs and gradients equal the plain ``Sequential``'s to float32
rounding (tests compare both, and check the backward by ``gradcheck`` in float64).
docs/benchmarks.md has what it buys, and where it does not pay (see :func:`applies`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# The fast path pays where the network's input is thin and the pixels many: it serves inputs
# of at most MAX_CHANNELS channels with at least MIN_ROWS_PER_CHANNEL pixels (over the batch)
# per channel. Measured (docs/benchmarks.md): 1.09x to 1.28x inside that, 0.85x to 0.99x
# outside it (6 or more channels, or 2 channels over 2,048 pixels) ...
MAX_CHANNELS = 4
MIN_ROWS_PER_CHANNEL = 2048
# ... and only for networks of at least this many hidden channels (0.70x to 0.92x at 16 to 48,
# 1.34x to 1.36x at 64 to 256, for 2 -> F -> 4 channels at 16x16, batch 64).
MIN_HIDDEN = 64
CHANNELS_LAST = torch.channels_last
# oneDNN's convolution with a ReLU post-op (a private op of torch's CPU builds; without it
# the convolution and the ReLU run one after the other).
_FUSED_RELU = hasattr(torch.ops.mkldnn, "_convolution_pointwise")
_ONEDNN = torch.backends.mkldnn.is_available()
# Offsets (di, dj) of the nine taps of a 3x3 kernel, in the kernel's row-major order.
TAPS = [(i - 1, j - 1) for i in range(3) for j in range(3)]


def applies(x: Tensor, hidden: int) -> bool:
    """Whether :class:`FusedCouplingNetwork` serves ``x`` for a network of ``hidden`` channels:
    float32 on the CPU with oneDNN, a thin input (``MAX_CHANNELS``), many pixels
    (``MIN_ROWS_PER_CHANNEL``) and a wide network (``MIN_HIDDEN``). It runs in channels_last
    whatever the layout of ``x``: a thin input costs little to copy."""
    if x.dim() != 4 or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    batch, channels, height, width = x.shape
    return (
        channels <= MAX_CHANNELS
        and batch * height * width >= MIN_ROWS_PER_CHANNEL * channels
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


def _conv_relu(x: Tensor, weight: Tensor, bias: Tensor, padding: int) -> Tensor:
    if x.dtype == torch.float32 and _FUSED_RELU:
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, [padding] * 2, [1, 1], [1, 1], 1, "relu", [], ""
        )
    return F.conv2d(x, weight, bias, padding=padding).relu_()


def _relu_backward_(grad: Tensor, output: Tensor) -> Tensor:
    """``grad`` zeroed where the ReLU's ``output`` is, in place (no new buffer)."""
    return torch.ops.aten.threshold_backward.grad_input(grad, output, 0, grad_input=grad)


def _conv_backward(grad: Tensor, x: Tensor, weight: Tensor, padding: int,
                   mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]], [1, 1], [padding] * 2, [1, 1], False, [0, 0], 1,
        mask,
    )


class FusedCouplingNetwork(torch.autograd.Function):
    """``apply(x, w1, b1, w2, b2, w3, b3, raw_log_gain, factor)``: the coupling network of
    :func:`~tzkcli.flows.layers.coupling_network` on ``x`` (``[B, C, H, W]``,
    channels_last), its output scaled by ``exp(factor * raw_log_gain)``.

    Works in float32 (oneDNN's fused ReLU) and in float64 (plain convolutions, for tests);
    no double backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor,
                b3: Tensor, raw_log_gain: Tensor, factor: float) -> Tensor:
        x = x.contiguous(memory_format=CHANNELS_LAST)
        h1 = _conv_relu(x, w1, b1, padding=1)
        h2 = _conv_relu(h1, w2, b2, padding=0)

        # [F, 9 O]: column t * O + o holds w3[o, :, i, j] for tap t = 3 i + j.
        outputs, features = w3.shape[0], w3.shape[1]
        w3_taps = w3.permute(1, 2, 3, 0).reshape(features, 9 * outputs)
        batch, _, height, width = h2.shape
        products = _pixels(h2).reshape(-1, features) @ w3_taps
        conv = _sum_taps(products.view(batch, height, width, 9, outputs), 1) + b3

        gain = torch.exp(factor * raw_log_gain)
        ctx.save_for_backward(x, w1, h1, w2, h2, w3_taps, conv, gain)
        ctx.factor = factor
        return _as_maps(conv * gain.view(-1))

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, w1, h1, w2, h2, w3_taps, conv, gain = ctx.saved_tensors
        grad = _pixels(grad_y)
        features, outputs = w3_taps.shape[0], gain.numel()

        # y = conv * gain
        grad_gain = ctx.factor * gain * (grad * conv).sum(dim=(0, 1, 2)).view_as(gain)
        grad_conv = grad * gain.view(-1)

        # conv = sum of shifted tap products
        grad_products = _spread_taps(grad_conv).view(-1, 9 * outputs)
        # As ([9 O, F])^T: MKL runs this orientation about 1.4x as fast.
        grad_w3_taps = (grad_products.T @ _pixels(h2).reshape(-1, features)).T
        grad_w3 = grad_w3_taps.view(features, 3, 3, outputs).permute(3, 0, 1, 2)
        grad_b3 = grad_conv.sum(dim=(0, 1, 2))
        grad_h2 = _as_maps((grad_products @ w3_taps.T).view(*grad.shape[:3], features))

        grad_h2 = _relu_backward_(grad_h2, h2)
        grad_h1, grad_w2, grad_b2 = _conv_backward(grad_h2, h1, w2, 0, [True, True, True])
        grad_h1 = _relu_backward_(grad_h1, h1)

        _, grad_w1, grad_b1 = _conv_backward(grad_h1, x, w1, 1, [False, True, True])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad_3x3(grad_h1, w1)

        return (grad_x, grad_w1, grad_b1, grad_w2, grad_b2,
                grad_w3.contiguous(memory_format=CHANNELS_LAST), grad_b3, grad_gain, None)


def _input_grad_3x3(grad: Tensor, weight: Tensor) -> Tensor:
    """The input gradient of a 'same' 3x3 convolution with few input channels: each pixel's
    output gradient times ``[F, 9 C]`` (one ``C``-block per tap), summed back at the taps'
    input pixels."""
    hidden, channels = weight.shape[0], weight.shape[1]
    # [F, 9 C]: column t * C + c holds weight[:, c, i, j] for tap t = 3 i + j.
    w_taps = weight.permute(0, 2, 3, 1).reshape(hidden, 9 * channels)
    pixels = _pixels(grad)
    products = pixels.reshape(-1, hidden) @ w_taps
    taps = products.view(*pixels.shape[:3], 9, channels)
    return _as_maps(_sum_taps(taps, -1))
