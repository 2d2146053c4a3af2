"""Conv2d as a GEMM: the channels-last reduction order shared by the weight and the unfolded input.

A Conv2d weight [O, C, kh, kw] (groups=1) is served as the GEMM weight W [O, K], K = kh*kw*C, with
column ``(i * kw + j) * C + c`` holding W[:, c, i, j]: the input channels of one kernel position
are consecutive, so a 2:4 group is 4 consecutive input channels at the same kernel position (the
order sparse tensor cores and NVIDIA's ASP use), and blocks run along the same order. The input
side is :func:`im2col`: row ``(n * Ho + oh) * Wo + ow`` holds the patch of output pixel (oh, ow)
in that same K order, so ``im2col(x) @ W.T`` is the convolution. Masks, calibration statistics
(Wanda's input norms, SparseGPT's Hessian over patches), packing and the kernels all go through
these two functions, so they cannot disagree about the order.

The output of the GEMM is [N*Ho*Wo, O], which is the channels-last (NHWC) layout: viewed as
[N, O, Ho, Wo] it needs no copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _pair(v, what: str) -> tuple[int, int]:
    t = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
        raise ValueError(f"{what} must be an int or two ints, got {v!r}")
    return int(t[0]), int(t[1])


@dataclass(frozen=True)
class ConvGeometry:
    """Everything but the weight values that a Conv2d's output depends on (groups == 1).

    ``pad`` is (top, bottom, left, right): explicit, so padding="same" with an even kernel (which
    pads one more at the bottom/right, as PyTorch does) is one case among others. ``padding`` is
    what F.conv2d is given (ints, or "same"/"valid").
    """

    in_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    padding_mode: str = "zeros"

    def __post_init__(self):
        kh, kw = self.kernel_size
        if self.in_channels <= 0 or kh <= 0 or kw <= 0:
            raise ValueError(f"conv needs in_channels and kernel_size > 0, got {self.in_channels}, {self.kernel_size}")
        if min(self.stride) <= 0 or min(self.dilation) <= 0:
            raise ValueError(f"conv needs stride and dilation > 0, got {self.stride}, {self.dilation}")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}")
        if isinstance(self.padding, str):
            if self.padding not in ("same", "valid"):
                raise ValueError(f"padding must be ints, 'same' or 'valid', got {self.padding!r}")
            if self.padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' needs stride 1 (as in nn.Conv2d)")
        elif min(self.padding) < 0:
            raise ValueError(f"padding must be >= 0, got {self.padding}")

    @classmethod
    def of(cls, conv: nn.Conv2d) -> "ConvGeometry":
        if conv.groups != 1:
            raise ValueError(f"grouped conv (groups={conv.groups}) has no single GEMM weight")
        pad = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding, "padding")
        return cls(conv.in_channels, _pair(conv.kernel_size, "kernel_size"), _pair(conv.stride, "stride"),
                   _pair(conv.dilation, "dilation"), pad, conv.padding_mode)

    @property
    def k(self) -> int:
        """GEMM reduction length kh*kw*C."""
        return self.kernel_size[0] * self.kernel_size[1] * self.in_channels

    @property
    def pad(self) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) zeros (or padding_mode values) around the input."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":  # PyTorch's split: the odd element goes to the bottom/right
            (kh, kw), (dh, dw) = self.kernel_size, self.dilation
            th, tw = dh * (kh - 1), dw * (kw - 1)
            return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        ph, pw = self.padding
        return (ph, ph, pw, pw)

    @property
    def unfolds(self) -> bool:
        """Whether :func:`im2col` copies: False for a 1x1 stride-1 unpadded conv (the input is the GEMM's)."""
        return (self.kernel_size, self.stride) != ((1, 1), (1, 1)) or any(self.pad)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """(Ho, Wo) for an input of h x w; RuntimeError when the kernel does not fit."""
        top, bottom, left, right = self.pad
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        hp, wp = h + top + bottom, w + left + right
        if hp < eh or wp < ew:
            raise RuntimeError(f"conv input of {h}x{w} (padded {hp}x{wp}) is smaller than the dilated kernel {eh}x{ew}")
        return (hp - eh) // sh + 1, (wp - ew) // sw + 1

    def input_size_for(self, ho: int, wo: int) -> tuple[int, int]:
        """The smallest input (h, w) >= 1x1 that gives at least ho x wo outputs (to make test images)."""
        top, bottom, left, right = self.pad
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        h = (ho - 1) * sh + dh * (kh - 1) + 1 - top - bottom
        w = (wo - 1) * sw + dw * (kw - 1) + 1 - left - right
        return max(h, 1), max(w, 1)

    def to_dict(self) -> dict:
        """JSON-able form (checkpoint configs)."""
        return {"in_channels": self.in_channels, "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "dilation": list(self.dilation),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "padding_mode": self.padding_mode}

    @classmethod
    def from_dict(cls, d) -> "ConvGeometry":
        """Inverse of :meth:`to_dict`; ValueError naming what is malformed."""
        if not isinstance(d, dict) or set(d) != {"in_channels", "kernel_size", "stride", "dilation", "padding",
                                                  "padding_mode"}:
            raise ValueError(f"conv geometry must be a map of in_channels, kernel_size, stride, dilation, padding, "
                             f"padding_mode; got {d!r}")
        c = d["in_channels"]
        if not isinstance(c, int) or isinstance(c, bool):
            raise ValueError(f"in_channels must be an int, got {c!r}")
        pad = d["padding"] if isinstance(d["padding"], str) else _pair(d["padding"], "padding")
        if not isinstance(d["padding_mode"], str):
            raise ValueError(f"padding_mode must be a string, got {d['padding_mode']!r}")
        return cls(c, _pair(d["kernel_size"], "kernel_size"), _pair(d["stride"], "stride"),
                   _pair(d["dilation"], "dilation"), pad, d["padding_mode"])

    def describe(self) -> str:
        """A short signature (autotune cache key, reprs)."""
        return (f"k={self.kernel_size[0]}x{self.kernel_size[1]},s={self.stride[0]}x{self.stride[1]},"
                f"d={self.dilation[0]}x{self.dilation[1]},pad={'/'.join(map(str, self.pad))},{self.padding_mode}")


def conv_weight_to_gemm(weight: torch.Tensor) -> torch.Tensor:
    """[O, C, kh, kw] -> [O, kh*kw*C] in the channels-last reduction order (a copy unless the
    weight is stored channels-last)."""
    if weight.dim() != 4:
        raise ValueError(f"expected a 4-D conv weight [O, C, kh, kw], got shape {tuple(weight.shape)}")
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def gemm_to_conv_weight(w2d: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`conv_weight_to_gemm`: [O, kh*kw*C] -> [O, C, kh, kw] (a channels-last
    strided view of ``w2d`` when it is contiguous)."""
    o, c, kh, kw = shape
    if tuple(w2d.shape) != (o, kh * kw * c):
        raise ValueError(f"GEMM weight of shape {tuple(w2d.shape)} does not fit a conv weight {tuple(shape)}")
    return w2d.reshape(o, kh, kw, c).permute(0, 3, 1, 2)


def gemm_weight(module: nn.Module) -> torch.Tensor:
    """The weight of an nn.Linear as it is, of an nn.Conv2d in the GEMM order (detached)."""
    w = module.weight.detach()
    return conv_weight_to_gemm(w) if isinstance(module, nn.Conv2d) else w


def set_gemm_weight(module: nn.Module, w2d: torch.Tensor) -> None:
    """Writes a GEMM-order weight back into an nn.Linear / nn.Conv2d (in place, same dtype)."""
    w = module.weight.data
    new = gemm_to_conv_weight(w2d, w.shape) if isinstance(module, nn.Conv2d) else w2d
    w.copy_(new.to(w.dtype))


def gemm_shape(module: nn.Module) -> tuple[int, int]:
    """(out, K) of the GEMM a Linear or (groups=1) Conv2d computes."""
    if isinstance(module, nn.Conv2d):
        o, c, kh, kw = module.weight.shape
        return o, kh * kw * c
    return tuple(module.weight.shape)


def im2col(x: torch.Tensor, geom: ConvGeometry) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Patches of ``x`` [N, C, H, W] (any memory format) as ([N*Ho*Wo, kh*kw*C], (N, Ho, Wo)).

    Built from the channels-last view of x with views (pad, unfold) and one copy (the final
    reshape); a 1x1 stride-1 unpadded conv on a channels-last contiguous input copies nothing.
    """
    n, c, h, w = x.shape
    ho, wo = geom.output_size(h, w)
    top, bottom, left, right = geom.pad
    padded = top or bottom or left or right
    if padded and geom.padding_mode != "zeros":
        x = F.pad(x, (left, right, top, bottom), mode=geom.padding_mode)
    xn = x.permute(0, 2, 3, 1)  # [N, H, W, C]: a contiguous view for channels-last x
    if padded and geom.padding_mode == "zeros":
        xn = F.pad(xn, (0, 0, left, right, top, bottom))
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel_size, geom.stride, geom.dilation
    if not geom.unfolds:
        return xn.reshape(n * ho * wo, c), (n, ho, wo)
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    u = xn.unfold(1, eh, sh).unfold(2, ew, sw)  # [N, Ho', Wo', C, eh, ew]
    u = u[..., ::dh, ::dw]
    return u.permute(0, 1, 2, 4, 5, 3).reshape(n * ho * wo, geom.k), (n, ho, wo)


def _reference_im2col(x: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """Plain torch via F.unfold (which orders K as (c, i, j)), reordered to (i, j, c); for tests."""
    top, bottom, left, right = geom.pad
    mode = "constant" if geom.padding_mode == "zeros" else geom.padding_mode
    xp = F.pad(x.contiguous(), (left, right, top, bottom), mode=mode)
    cols = F.unfold(xp, geom.kernel_size, dilation=geom.dilation, stride=geom.stride)  # [N, C*kh*kw, L]
    n, c = x.shape[:2]
    kh, kw = geom.kernel_size
    cols = cols.reshape(n, c, kh * kw, -1).permute(0, 3, 2, 1)  # [N, L, kh*kw, C]
    return cols.reshape(-1, kh * kw * c)
