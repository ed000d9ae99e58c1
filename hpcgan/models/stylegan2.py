"""StyleGAN2 (Karras et al. 2020) in plain PyTorch: the model class that wins on scarce medical data.

G: a mapping network turns z into a style w; a learned 4x4 constant is refined resolution by
resolution by modulated/demodulated 3x3 convolutions with per-layer noise; every resolution adds its
own gray image to an upsampled sum (the skip architecture). D: residual blocks down to 4x4, minibatch
standard deviation, two dense layers, one logit. Equalised learning rate everywhere (weights stored
N(0, 1), scaled at run time by 1/sqrt(fan_in), times 0.01 in the mapping network), so Adam's
per-parameter steps are comparable across layers. Style affines start with bias 1 (styles near 1),
noise strengths and all other biases with 0, the constant input N(0, 1).

Conditional (`model.conditional`), as StyleGAN2-ADA: a class embedding, normalised like z, is
concatenated with z as the mapping network's input, so the class steers every style; D adds the
projection <embed(y), h> to its logit on the epilogue's last features h (Miyato & Koyama 2018; ADA maps
the class first, a plain embedding suffices here). Without classes nothing of either is built.

Choices made for portability and speed, all in ordinary PyTorch ops:
- Modulation scales the activations, not the weights ("non-fused"): one shared-weight convolution for
  the whole batch, the fast path of every backend. The mapping network, the styles, the demodulation
  coefficients and the summed image stay float32 under autocast; the feature maps follow autocast.
- Resampling uses the [1, 3, 3, 1] filter in G and D alike. G doubles a feature map with a stride-2
  transposed convolution followed by that filter, which is bilinear upsampling followed by the 3x3
  convolution, at a quarter of its cost; its gray image is upsampled bilinearly (the same filter).
  D filters, then convolves with stride 2. The filter leaves less aliasing than a 2x2 average.
- Each LeakyReLU's gain sqrt(2) (and the residual 1/sqrt(2)) is folded into the small weight, bias
  and style tensors, since LeakyReLU commutes with positive scaling: no extra pass over activations.
- Noise inputs and style mixing draw from the global RNG of the input's device: checkpoints restore it.

fp16 (`train.mixed_precision=fp16`): its range ends at 65504, and styles and weights grow over a long
run until a product overflows to inf and then NaN, as StyleGAN2-ADA observed. Layers running in fp16
therefore clamp their outputs to +-256 (`FP16_CLAMP`), and a demodulated convolution first divides its
weight (per output channel) and its styles (per sample) by their largest magnitude, so the activations
it multiplies stay small; demodulation divides both scales out again, so only rounding changes. In
float32 and bf16 (float32's range) neither happens: those outputs are exactly what they were.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hpcgan.config import ModelConfig

GAIN = math.sqrt(2)  # LeakyReLU(0.2) gain: keeps activations' scale through the layers
FP16_CLAMP = 256.0  # bound on a layer's fp16 outputs: far below fp16's 65504, far above useful activations


def widths(cfg: ModelConfig) -> dict[int, int]:
    """Feature maps per resolution, 4 .. cfg.resolution."""
    levels = int(math.log2(cfg.resolution))
    return {2 ** i: min(cfg.channel_base // 2 ** i, cfg.channel_max) for i in range(2, levels + 1)}


def blur_kernel(gain: float = 1.0) -> torch.Tensor:
    """The separable [1, 3, 3, 1] filter, (1, 1, 4, 4), to expand into a depthwise convolution weight."""
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = torch.outer(f, f)
    return (k * (gain / k.sum())).view(1, 1, 4, 4)


def blur(x: torch.Tensor, kernel: torch.Tensor, padding: int) -> torch.Tensor:
    """Each channel of `x` convolved with the (1, 1, 4, 4) `kernel`. Stride 1: a strided depthwise
    convolution's backward is ~10x slower in bf16 on CPU (measured); the next convolution strides."""
    c = x.shape[1]
    return F.conv2d(x, kernel.expand(c, -1, -1, -1), padding=padding, groups=c)


def full_precision(x: torch.Tensor) -> torch.autocast:
    """A region that autocast leaves in float32."""
    return torch.autocast(x.device.type, enabled=False)


def runs_in_fp16(x: torch.Tensor) -> bool:
    """Whether a layer given `x` computes in float16: x is, or autocast casts to it."""
    kind = x.device.type
    return x.dtype == torch.float16 or (torch.is_autocast_enabled(kind) and
                                        torch.get_autocast_dtype(kind) == torch.float16)


def clamp_fp16(x: torch.Tensor, limit: float | None) -> torch.Tensor:
    """`x` within +-limit if it is float16 (an overflowed inf becomes the limit); otherwise untouched."""
    return x.clamp(-limit, limit) if limit is not None and x.dtype == torch.float16 else x


class Dense(nn.Module):
    """A fully connected layer with equalised learning rate, a learning-rate multiplier and an optional
    LeakyReLU."""

    def __init__(self, c_in: int, c_out: int, *, bias_init: float = 0.0, lr_mul: float = 1.0,
                 act: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in) / lr_mul)
        self.bias = nn.Parameter(torch.full((c_out,), bias_init / lr_mul))
        gain = GAIN if act else 1.0
        self.weight_gain, self.bias_gain, self.act = gain * lr_mul / math.sqrt(c_in), gain * lr_mul, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)
        return F.leaky_relu(x, 0.2) if self.act else x


class Conv(nn.Module):
    """D's convolution: equalised learning rate, optional [1, 3, 3, 1]-filtered downsampling by 2, and
    an output `gain` (after the activation's)."""

    def __init__(self, c_in: int, c_out: int, k: int, *, bias: bool = True, act: bool = True,
                 down: bool = False, gain: float = 1.0, clamp: float | None = FP16_CLAMP) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        gain *= GAIN if act else 1.0
        self.weight_gain, self.bias_gain = gain / math.sqrt(c_in * k * k), gain
        self.act, self.down, self.k, self.clamp = act, down, k, clamp
        if down:
            self.register_buffer("blur", blur_kernel(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.bias_gain if self.bias is not None else None
        weight = self.weight * self.weight_gain
        if self.down:  # filter, then convolve with stride 2: output pixel i sits between inputs 2i and 2i+1
            x = F.conv2d(blur(x, self.blur, padding=(self.k + 1) // 2), weight, bias, stride=2)
        else:
            x = F.conv2d(x, weight, bias, padding=self.k // 2)
        return clamp_fp16(F.leaky_relu(x, 0.2) if self.act else x, self.clamp)


def normalize_2nd_moment(x: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit mean square: the mapping's inputs keep one scale whatever their size."""
    return x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()


class Mapping(nn.Module):
    """z (and a class) -> w, in float32; tracks the average w, the centre that truncation pulls styles
    towards (over all classes, as StyleGAN2-ADA)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # Stored N(0, 1) and normalised in the forward: its scale is z's whatever Adam does to it.
        self.embed = nn.Embedding(cfg.num_classes, cfg.w_dim) if cfg.num_classes else None
        dims = [cfg.nz + (cfg.w_dim if cfg.num_classes else 0)] + [cfg.w_dim] * cfg.mapping_layers
        self.layers = nn.Sequential(*[Dense(a, b, lr_mul=0.01, act=True) for a, b in zip(dims, dims[1:])])
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        with full_precision(z):
            x = normalize_2nd_moment(z.float())
            if self.embed is not None:
                x = torch.cat([x, normalize_2nd_moment(self.embed(labels).float())], dim=1)
            return self.layers(x)

    @torch.no_grad()
    def track(self, w: torch.Tensor, beta: float = 0.995) -> None:
        self.w_avg.lerp_(w.detach().mean(dim=0), 1.0 - beta)


class ModulatedConv(nn.Module):
    """A convolution whose input channels are scaled by a per-sample style and, with `demodulate`, whose
    output is scaled back to unit variance (StyleGAN2's replacement of AdaIN). `up` doubles the size."""

    def __init__(self, c_in: int, c_out: int, w_dim: int, k: int = 3, *, demodulate: bool = True,
                 up: bool = False, gain: float = 1.0, clamp: float | None = FP16_CLAMP) -> None:
        super().__init__()
        self.clamp = clamp
        self.affine = Dense(w_dim, c_in, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k))
        # Demodulation divides out the weight's scale: only without it does the 1/sqrt(fan_in) gain matter.
        self.gain = gain if demodulate else gain / math.sqrt(c_in * k * k)
        self.demodulate, self.up, self.k = demodulate, up, k
        if up:
            self.register_buffer("blur", blur_kernel(gain=4.0), persistent=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`bias` (c_out,), for a demodulating convolution, is added in the demodulation's pass."""
        weight, prenormalise = self.weight, self.demodulate and self.clamp is not None and runs_in_fp16(x)
        with full_precision(w):
            styles = self.affine(w.float())
            if self.demodulate:
                if prenormalise:  # scales that demodulation divides out again
                    weight = weight / weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True)
                    styles = styles / styles.detach().abs().amax(dim=1, keepdim=True)
                # 1 / ||weight_oi * style_i|| per sample and output channel
                sigma = styles.square() @ weight.float().square().sum(dim=(2, 3)).t()
                out_scale = (sigma + 1e-8).rsqrt() * self.gain
            else:
                styles = styles * self.gain
        x = x * styles.to(x.dtype)[:, :, None, None]
        if self.up:  # = bilinear upsampling, then the 3x3 convolution (with the kernel flipped)
            x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
            x = blur(x, self.blur, padding=1)
        else:
            x = F.conv2d(x, weight, padding=self.k // 2)
        if not self.demodulate:
            return clamp_fp16(x, self.clamp)
        x = torch.addcmul(bias.to(x.dtype)[:, None, None], x, out_scale.to(x.dtype)[:, :, None, None])
        return clamp_fp16(x, self.clamp)


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution, per-pixel noise of learned strength, bias, LeakyReLU."""

    def __init__(self, c_in: int, c_out: int, w_dim: int, up: bool = False,
                 clamp: float | None = FP16_CLAMP) -> None:
        super().__init__()
        self.conv = ModulatedConv(c_in, c_out, w_dim, up=up, gain=GAIN, clamp=clamp)
        self.clamp = clamp
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(c_out))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = self.conv(x, w, self.bias * GAIN)
        noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
        x = F.leaky_relu(torch.addcmul(x, noise, (self.noise_strength * GAIN).to(x.dtype)), 0.2)
        return clamp_fp16(x, self.clamp)


class ToGray(nn.Module):
    """Modulated 1x1 convolution to image channels, without demodulation (StyleGAN2's ToRGB)."""

    def __init__(self, c_in: int, channels: int, w_dim: int, clamp: float | None = FP16_CLAMP) -> None:
        super().__init__()
        self.conv = ModulatedConv(c_in, channels, w_dim, k=1, demodulate=False, clamp=clamp)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(x, w).float() + self.bias[:, None, None]


class Generator(nn.Module):
    def __init__(self, cfg: ModelConfig, fp16_clamp: float | None = FP16_CLAMP) -> None:
        """`fp16_clamp`: the bound of fp16 outputs; None turns clamping and pre-normalisation off."""
        super().__init__()
        self.nz, self.style_mixing, self.num_classes = cfg.nz, cfg.style_mixing, cfg.num_classes
        ch, c = widths(cfg), fp16_clamp
        self.mapping = Mapping(cfg)
        self.const = nn.Parameter(torch.randn(ch[4], 4, 4))
        self.layers = nn.ModuleList([SynthesisLayer(ch[4], ch[4], cfg.w_dim, clamp=c)])
        self.to_gray = nn.ModuleList([ToGray(ch[4], cfg.channels, cfg.w_dim, clamp=c)])
        for res in list(ch)[1:]:
            self.layers.extend([SynthesisLayer(ch[res // 2], ch[res], cfg.w_dim, up=True, clamp=c),
                                SynthesisLayer(ch[res], ch[res], cfg.w_dim, clamp=c)])
            self.to_gray.append(ToGray(ch[res], cfg.channels, cfg.w_dim, clamp=c))

    @property
    def num_styles(self) -> int:
        """Style inputs: one per synthesis layer plus the last ToGray (each other ToGray shares the style
        of the layer after it)."""
        return len(self.layers) + 1

    def styles(self, z: torch.Tensor, labels: torch.Tensor | None = None,
               truncation_psi: float = 1.0) -> torch.Tensor:
        """(N, num_styles, w_dim) float32, one w per layer. In training, w_avg follows w and, with
        probability `style_mixing`, a second latent (of the same class) takes over from a random layer on,
        so that G cannot rely on neighbouring layers sharing a style. The draw stays on the device (no
        host sync)."""
        w = self.mapping(z, labels)
        if self.training:
            self.mapping.track(w)
        ws = w.unsqueeze(1).expand(-1, self.num_styles, -1)
        if self.training and self.style_mixing > 0:
            cutoff = torch.randint(1, self.num_styles, (), device=z.device)
            mix = torch.rand((), device=z.device) < self.style_mixing
            cutoff = torch.where(mix, cutoff, torch.full_like(cutoff, self.num_styles))
            w2 = self.mapping(torch.randn_like(z), labels)
            after = (torch.arange(self.num_styles, device=z.device) >= cutoff)[None, :, None]
            ws = torch.where(after, w2.unsqueeze(1), ws)
        if truncation_psi != 1.0:
            ws = self.mapping.w_avg.lerp(ws, truncation_psi)
        return ws

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None,
                truncation_psi: float = 1.0) -> torch.Tensor:
        """(N, channels, R, R) float32 images, useful range [-1, 1] (linear output, no tanh); `labels`
        (N,) int64 class indices, required when conditional."""
        ws = self.styles(z, labels, truncation_psi)
        x = self.const.unsqueeze(0).expand(z.shape[0], -1, -1, -1)
        x = self.layers[0](x, ws[:, 0])
        image = self.to_gray[0](x, ws[:, 1])
        for i, to_gray in enumerate(self.to_gray[1:]):
            x = self.layers[1 + 2 * i](x, ws[:, 1 + 2 * i])
            x = self.layers[2 + 2 * i](x, ws[:, 2 + 2 * i])
            image = F.interpolate(image, scale_factor=2, mode="bilinear") + to_gray(x, ws[:, 3 + 2 * i])
        return image


class DBlock(nn.Module):
    """Two convolutions, the second halving the size, beside a filtered 1x1 skip; summed at unit variance."""

    def __init__(self, c_in: int, c_out: int, clamp: float | None = FP16_CLAMP) -> None:
        super().__init__()
        self.conv0 = Conv(c_in, c_in, 3, clamp=clamp)
        self.conv1 = Conv(c_in, c_out, 3, down=True, gain=math.sqrt(0.5), clamp=clamp)
        self.skip = Conv(c_in, c_out, 1, bias=False, act=False, down=True, gain=math.sqrt(0.5), clamp=clamp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.conv1(self.conv0(x))


def minibatch_stddev(x: torch.Tensor, group: int = 4) -> torch.Tensor:
    """One extra channel: the standard deviation across a group of samples, so D can see a batch that
    lacks variety (mode collapse). The group is the largest size <= `group` that divides the batch;
    sample j belongs to group j mod (N / size)."""
    n, c, h, w = x.shape
    g = max(d for d in range(1, min(group, n) + 1) if n % d == 0)
    y = x.float().reshape(g, n // g, c, h, w)
    y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (n // g,)
    y = y.repeat(g).view(n, 1, 1, 1).expand(n, 1, h, w).to(x.dtype)
    return torch.cat([x, y], dim=1)


class Discriminator(nn.Module):
    def __init__(self, cfg: ModelConfig, fp16_clamp: float | None = FP16_CLAMP) -> None:
        """`fp16_clamp`: the bound of its convolutions' fp16 outputs; None turns clamping off."""
        super().__init__()
        ch, c = widths(cfg), fp16_clamp
        resolutions = sorted(ch, reverse=True)  # R .. 4
        self.from_gray = Conv(cfg.channels, ch[resolutions[0]], 1, clamp=c)
        self.blocks = nn.Sequential(*[DBlock(ch[r], ch[r // 2], clamp=c) for r in resolutions[:-1]])
        self.conv = Conv(ch[4] + 1, ch[4], 3, clamp=c)
        self.dense = Dense(ch[4] * 16, ch[4], act=True)
        self.out = Dense(ch[4], 1)
        self.num_classes = cfg.num_classes
        # Equalised like Dense: stored N(0, 1), scaled by 1/sqrt(features) in the forward.
        self.project = nn.Embedding(cfg.num_classes, ch[4]) if cfg.num_classes else None
        self.project_gain = 1 / math.sqrt(ch[4])

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) logits; `labels` (N,) int64 class indices, required when conditional."""
        # A one-channel image and FromGray's 1x1 weight have no layout of their own, so FromGray's output
        # would be NCHW: give it the layout the other weights have (channels_last after .to()).
        cl = self.conv.weight.is_contiguous(memory_format=torch.channels_last)
        x = self.from_gray(x).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        x = self.blocks(x)
        x = self.conv(minibatch_stddev(x))
        h = self.dense(x.flatten(1))
        if self.project is None:
            return self.out(h).flatten()
        return self.out(h).flatten() + (self.project(labels) * h).sum(dim=1) * self.project_gain


def build(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    return Generator(cfg), Discriminator(cfg)
