"""PyTorch twins of ``facenet_jax.models`` for ``experiments/bench_train_step.py``.

Each twin is the same network as ours: the same layers in the same order, the same padding
(lax's "SAME" is asymmetric for even inputs at stride 2, so it is padded explicitly), the same
parameter count, BatchNorm with epsilon 1e-5 and batch statistics in training. ``copy_variables``
copies a Flax ``{"params", "batch_stats"}`` tree into a twin leaf by leaf (shapes checked), so the
benchmark can check that both compute the same embeddings before timing them.

Tensors are NCHW (PyTorch's native layout); the "flatten" heads permute to NHWC first so the
flattened features are in Flax's order. Shapes: images [B, C, H, W] -> embeddings [B, d], unit norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-5  # flax.linen.BatchNorm's default
BN_MOMENTUM = 0.1  # torch's convention for Flax's momentum 0.9


def same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    """lax.padtype_to_pads for one dimension: (lo, hi) with hi - lo in {0, 1}."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class Conv(nn.Module):
    """Conv2d with Flax's padding: "SAME" (lax's split, asymmetric when odd) or "VALID"."""

    def __init__(self, cin, cout, k, stride=1, padding="SAME", groups=1, bias=False):
        super().__init__()
        self.k = (k, k) if isinstance(k, int) else tuple(k)
        self.stride, self.padding = stride, padding
        self.conv = nn.Conv2d(cin, cout, self.k, stride, 0, groups=groups, bias=bias)

    def forward(self, x):
        if self.padding == "VALID":
            return self.conv(x)
        (t, b), (lft, r) = (
            same_pads(x.shape[d], k, self.stride) for d, k in zip((2, 3), self.k, strict=True)
        )
        if t == b and lft == r:
            return F.conv2d(
                x, self.conv.weight, self.conv.bias, self.stride, (t, lft), 1, self.conv.groups
            )
        return self.conv(F.pad(x, (lft, r, t, b)))


class MaxPool(nn.Module):
    """Max-pool with Flax's padding (-inf), window k, stride s."""

    def __init__(self, k, s, padding="SAME"):
        super().__init__()
        self.k, self.s, self.padding = k, s, padding

    def forward(self, x):
        if self.padding == "SAME":
            (t, b), (lft, r) = (same_pads(x.shape[d], self.k, self.s) for d in (2, 3))
            if t or b or lft or r:
                x = F.pad(x, (lft, r, t, b), value=-math.inf)
        return F.max_pool2d(x, self.k, self.s)


def bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class FeatureBN(nn.Module):
    """BatchNorm1d; ``scale=False`` learns only the bias (insightface's frozen-scale BN)."""

    def __init__(self, d: int, scale: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm1d(d, eps=BN_EPS, momentum=BN_MOMENTUM, affine=scale)
        self.bias = None if scale else nn.Parameter(torch.zeros(d))

    def forward(self, x):
        x = self.bn(x)
        return x if self.bias is None else x + self.bias


def prelu(c: int) -> nn.PReLU:
    return nn.PReLU(c, init=0.25)


def _head_pool(x, pooling):
    return x.mean((2, 3)) if pooling == "avg" else x.permute(0, 2, 3, 1).flatten(1)


# ----------------------------------------------------------------------------- SmallCNN, ResNet


class SmallCNN(nn.Module):
    def __init__(self, width=32, embedding_dim=128, pooling="avg", image_size=64, channels=3):
        super().__init__()
        layers, c = [], channels
        for stage in range(3):
            for _ in range(2):
                layers += [Conv(c, width * 2**stage, 3), bn(width * 2**stage), nn.ReLU()]
                c = width * 2**stage
            layers.append(MaxPool(2, 2))
        self.features = nn.Sequential(*layers)
        side = math.ceil(image_size / 8)
        self.pooling = pooling
        self.projection = nn.Linear(c if pooling == "avg" else c * side * side, embedding_dim)

    def forward(self, x):
        return F.normalize(self.projection(_head_pool(self.features(x), self.pooling)), dim=1)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv0, self.bn0 = Conv(cin, cout, 3, stride), bn(cout)
        self.conv1, self.bn1 = Conv(cout, cout, 3), bn(cout)
        self.shortcut = None
        if cin != cout or stride != 1:
            self.shortcut = nn.Sequential(Conv(cin, cout, 1, stride), bn(cout))

    def forward(self, x):
        y = self.bn1(self.conv1(F.relu(self.bn0(self.conv0(x)))))
        return F.relu((x if self.shortcut is None else self.shortcut(x)) + y)


class ResNet(nn.Module):
    def __init__(
        self, stage_sizes, width=64, embedding_dim=128, pooling="avg", image_size=64, channels=3
    ):
        super().__init__()
        big = image_size >= 96
        stem = [Conv(channels, width, 7 if big else 3, 2 if big else 1), bn(width), nn.ReLU()]
        if big:
            stem.append(MaxPool(3, 2))
        self.stem = nn.Sequential(*stem)
        blocks, c = [], width
        for i, size in enumerate(stage_sizes):
            for j in range(size):
                blocks.append(BasicBlock(c, width * 2**i, 2 if i > 0 and j == 0 else 1))
                c = width * 2**i
        self.blocks = nn.Sequential(*blocks)
        side = math.ceil(image_size / (4 if big else 1) / 2 ** (len(stage_sizes) - 1))
        self.pooling = pooling
        self.projection = nn.Linear(c if pooling == "avg" else c * side * side, embedding_dim)

    def forward(self, x):
        x = _head_pool(self.blocks(self.stem(x)), self.pooling)
        return F.normalize(self.projection(x), dim=1)


# ----------------------------------------------------------------------------- IR-ResNet


class IRBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn0, self.conv0, self.bn1 = bn(cin), Conv(cin, cout, 3), bn(cout)
        self.prelu = prelu(cout)
        self.conv1, self.bn2 = Conv(cout, cout, 3, stride), bn(cout)
        self.shortcut = None
        if cin != cout or stride != 1:
            self.shortcut = nn.Sequential(Conv(cin, cout, 1, stride), bn(cout))

    def forward(self, x):
        y = self.prelu(self.bn1(self.conv0(self.bn0(x))))
        y = self.bn2(self.conv1(y))
        return (x if self.shortcut is None else self.shortcut(x)) + y


class IResNet(nn.Module):
    def __init__(
        self,
        stage_sizes,
        width=64,
        embedding_dim=512,
        pooling="flatten",
        image_size=112,
        channels=3,
    ):
        super().__init__()
        self.stem = nn.Sequential(Conv(channels, width, 3), bn(width), prelu(width))
        blocks, c = [], width
        for i, size in enumerate(stage_sizes):
            for j in range(size):
                blocks.append(IRBlock(c, width * 2**i, 2 if j == 0 else 1))
                c = width * 2**i
        self.blocks = nn.Sequential(*blocks)
        self.bn = bn(c)
        side = math.ceil(image_size / 2 ** len(stage_sizes))
        self.pooling = pooling
        self.fc = nn.Linear(c if pooling == "avg" else c * side * side, embedding_dim)
        self.features = FeatureBN(embedding_dim, scale=False)

    def forward(self, x):
        x = _head_pool(self.bn(self.blocks(self.stem(x))), self.pooling)
        return F.normalize(self.features(self.fc(x)), dim=1)


# ----------------------------------------------------------------------------- MobileFaceNet


class Bottleneck(nn.Module):
    def __init__(self, cin, cout, expansion, stride):
        super().__init__()
        hidden = cin * expansion
        self.body = nn.Sequential(
            Conv(cin, hidden, 1),
            bn(hidden),
            prelu(hidden),
            Conv(hidden, hidden, 3, stride, groups=hidden),
            bn(hidden),
            prelu(hidden),
            Conv(hidden, cout, 1),
            bn(cout),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileFaceNet(nn.Module):
    def __init__(self, width=64, embedding_dim=128, pooling="flatten", image_size=112, channels=3):
        from facenet_jax.models.mobilefacenet import BOTTLENECKS

        super().__init__()
        ch = lambda c: max(1, round(c * width / 64))  # noqa: E731
        c = ch(64)
        layers = [Conv(channels, c, 3, 2), bn(c), prelu(c), Conv(c, c, 3, groups=c), bn(c)]
        layers.append(prelu(c))
        for t, channels_out, n, s in BOTTLENECKS:
            for j in range(n):
                layers.append(Bottleneck(c, ch(channels_out), t, s if j == 0 else 1))
                c = ch(channels_out)
        layers += [Conv(c, ch(512), 1), bn(ch(512)), prelu(ch(512))]
        c = ch(512)
        side = math.ceil(image_size / 2)  # the stem, then the bottlenecks' strides (SAME)
        for _, _, _, s in BOTTLENECKS:
            side = math.ceil(side / s)
        self.pooling = pooling
        if pooling == "flatten":
            layers += [Conv(c, c, side, padding="VALID", groups=c), bn(c)]
        self.body = nn.Sequential(*layers)
        self.linear = nn.Linear(c, embedding_dim, bias=False)
        self.features = FeatureBN(embedding_dim)

    def forward(self, x):
        x = self.body(x)
        x = x.flatten(1) if self.pooling == "flatten" else x.mean((2, 3))
        return F.normalize(self.features(self.linear(x)), dim=1)


# ----------------------------------------------------------------------------- Inception-ResNet-v1


class ConvBN(nn.Module):
    def __init__(self, cin, cout, k, stride=1, padding="SAME"):
        super().__init__()
        self.conv, self.bn = Conv(cin, cout, k, stride, padding), bn(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionResidual(nn.Module):
    def __init__(self, cin, branches, scale, activate=True):
        super().__init__()
        self.branches = nn.ModuleList()
        total = 0
        for branch in branches:
            layers, c = [], cin
            for filters, kernel in branch:
                layers.append(ConvBN(c, filters, kernel))
                c = filters
            self.branches.append(nn.Sequential(*layers))
            total += c
        self.up = Conv(total, cin, 1, bias=True)
        self.scale, self.activate = scale, activate

    def forward(self, x):
        x = x + self.scale * self.up(torch.cat([b(x) for b in self.branches], 1))
        return F.relu(x) if self.activate else x


class InceptionResNetV1(nn.Module):
    def __init__(
        self, width=32, embedding_dim=128, pooling="avg", image_size=160, channels=3,
        repeats=(5, 10, 5),
    ):  # fmt: skip
        super().__init__()
        c = lambda n: max(1, round(n * width / 32))  # noqa: E731
        pad = "VALID" if image_size >= 96 else "SAME"
        self.pool = MaxPool(3, 2, pad)
        self.stem = nn.Sequential(
            ConvBN(channels, c(32), 3, 2, pad),
            ConvBN(c(32), c(32), 3, 1, pad),
            ConvBN(c(32), c(64), 3),
            self.pool,
            ConvBN(c(64), c(80), 1, 1, pad),
            ConvBN(c(80), c(192), 3, 1, pad),
            ConvBN(c(192), c(256), 3, 2, pad),
        )
        b35 = [[(c(32), 1)], [(c(32), 1), (c(32), 3)], [(c(32), 1), (c(32), 3), (c(32), 3)]]
        self.block35 = nn.Sequential(
            *[InceptionResidual(c(256), b35, 0.17) for _ in range(repeats[0])]
        )
        self.red_a_a = ConvBN(c(256), c(384), 3, 2, pad)
        self.red_a_b = nn.Sequential(
            ConvBN(c(256), c(192), 1), ConvBN(c(192), c(192), 3), ConvBN(c(192), c(256), 3, 2, pad)
        )
        n17 = c(384) + c(256) + c(256)
        b17 = [[(c(128), 1)], [(c(128), 1), (c(128), (1, 7)), (c(128), (7, 1))]]
        self.block17 = nn.Sequential(
            *[InceptionResidual(n17, b17, 0.10) for _ in range(repeats[1])]
        )
        self.red_b = nn.ModuleList(
            [
                nn.Sequential(ConvBN(n17, c(256), 1), ConvBN(c(256), c(384), 3, 2, pad)),
                nn.Sequential(ConvBN(n17, c(256), 1), ConvBN(c(256), c(256), 3, 2, pad)),
                nn.Sequential(
                    ConvBN(n17, c(256), 1),
                    ConvBN(c(256), c(256), 3),
                    ConvBN(c(256), c(256), 3, 2, pad),
                ),
            ]
        )
        n8 = c(384) + c(256) + c(256) + n17
        b8 = [[(c(192), 1)], [(c(192), 1), (c(192), (1, 3)), (c(192), (3, 1))]]
        block8 = [InceptionResidual(n8, b8, 0.20) for _ in range(repeats[2])]
        self.block8 = nn.Sequential(*block8, InceptionResidual(n8, b8, 1.0, activate=False))
        side = image_size
        for k, s in ((3, 2), (3, 1), (3, 2), (1, 1), (3, 1), (3, 2), (3, 2), (3, 2)):
            side = (side - k) // s + 1 if pad == "VALID" else math.ceil(side / s)
        self.pooling = pooling
        self.bottleneck = nn.Linear(n8 if pooling == "avg" else n8 * side * side, embedding_dim,
                                    bias=False)  # fmt: skip
        self.bottleneck_bn = FeatureBN(embedding_dim)

    def forward(self, x):
        x = self.block35(self.stem(x))
        x = torch.cat([self.red_a_a(x), self.red_a_b(x), self.pool(x)], 1)
        x = self.block17(x)
        x = torch.cat([b(x) for b in self.red_b] + [self.pool(x)], 1)
        x = _head_pool(self.block8(x), self.pooling)
        return F.normalize(self.bottleneck_bn(self.bottleneck(x)), dim=1)


# ----------------------------------------------------------------------------- loss


def semi_hard_triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """``losses.semi_hard_triplet_loss`` (squared distances) for a [B, d] batch, vectorised.

    Per valid pair (a, p), n = the negative with the smallest d(a,n) > d(a,p), else the negative
    with the largest d(a,n); mean of relu(d(a,p) - d(a,n) + margin) over valid pairs. Mining is a
    few [B, B, B] boolean/float ops without gradient (8 MB at B = 128).
    """
    sq = (emb * emb).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * emb @ emb.T).clamp_min(0)
    same = labels[:, None] == labels[None, :]
    neg = ~same
    valid = same & ~torch.eye(len(labels), dtype=torch.bool) & neg.any(1, keepdim=True)
    with torch.no_grad():
        dap, dan = d[:, :, None], d[:, None, :]
        beyond = neg[:, None, :] & (dan > dap)  # [a, p, n]
        inf = torch.tensor(math.inf)
        semi = torch.where(beyond, dan, inf).argmin(-1)
        farthest = torch.where(neg, d, -inf).argmax(-1, keepdim=True).expand_as(semi)
        n = torch.where(beyond.any(-1), semi, farthest)  # [a, p]
    hinge = F.relu(d - d.gather(1, n) + margin)
    return hinge[valid].mean()


# ----------------------------------------------------------------------------- registry, weights

PEERS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet10": lambda **kw: ResNet((1, 1, 1, 1), **kw),
    "resnet18": lambda **kw: ResNet((2, 2, 2, 2), **kw),
    "resnet34": lambda **kw: ResNet((3, 4, 6, 3), **kw),
    "ir18": lambda **kw: IResNet((2, 2, 2, 2), **kw),
    "ir34": lambda **kw: IResNet((3, 4, 6, 3), **kw),
    "ir50": lambda **kw: IResNet((3, 4, 14, 3), **kw),
    "mobilefacenet": MobileFaceNet,
    "inception_resnet_v1": InceptionResNetV1,
}


def create_peer(
    name: str, width: int, embedding_dim: int, pooling: str, image_size: int, channels: int = 3
) -> nn.Module:
    if name not in PEERS:
        raise ValueError(f"no PyTorch twin for model {name!r}; twins: {list(PEERS)}")
    return PEERS[name](
        width=width,
        embedding_dim=embedding_dim,
        pooling=pooling,
        image_size=image_size,
        channels=channels,
    )


def _flax_layers(params: dict, path: tuple = ()) -> list[tuple[str, ...]]:
    """Paths of the modules holding arrays in ``params``, in the dict's order."""
    out = [path] if any(not hasattr(v, "items") for v in params.values()) else []
    for k, v in params.items():
        if hasattr(v, "items"):
            out += _flax_layers(v, (*path, k))
    return out


def _lookup(tree: dict, path: tuple[str, ...]) -> dict:
    for k in path:
        tree = tree.get(k, {})
    return {k: v for k, v in tree.items() if not hasattr(v, "items")}


def creation_order(model, image_shape: tuple[int, int, int]) -> list[tuple[str, ...]]:
    """Module paths in the order Flax creates them: an eager ``init`` keeps dicts in insertion
    order (anything through ``jax.tree`` or ``jit`` comes back sorted by name)."""
    import jax
    import jax.numpy as jnp

    variables = model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False)
    return _flax_layers(variables["params"])


def _torch_leaf_modules(module: nn.Module) -> list[nn.Module]:
    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.PReLU, FeatureBN)
    out = []
    for m in module.modules():
        if isinstance(m, nn.BatchNorm1d):
            continue  # inside FeatureBN
        if isinstance(m, kinds):
            out.append(m)
    return out


def copy_variables(variables: dict, order: list[tuple[str, ...]], peer: nn.Module) -> None:
    """Copies Flax ``{"params", "batch_stats"}`` into ``peer``, layer by layer in creation
    ``order`` (``creation_order``), every shape checked."""
    flax_modules = [
        (
            "/".join(path),
            {**_lookup(variables["params"], path), **_lookup(variables["batch_stats"], path)},
        )
        for path in order
    ]
    torch_modules = _torch_leaf_modules(peer)
    if len(flax_modules) != len(torch_modules):
        raise ValueError(f"{len(flax_modules)} Flax layers vs {len(torch_modules)} in the twin")

    def put(dst: torch.Tensor, src: np.ndarray, where: str) -> None:
        if tuple(dst.shape) != src.shape:
            raise ValueError(f"{where}: twin {tuple(dst.shape)} vs Flax {src.shape}")
        with torch.no_grad():
            dst.copy_(torch.from_numpy(np.array(src, np.float32)))

    for (path, leaves), m in zip(flax_modules, torch_modules, strict=True):
        arrays = {k: np.asarray(v) for k, v in leaves.items()}
        if isinstance(m, nn.Conv2d):
            put(m.weight, arrays["kernel"].transpose(3, 2, 0, 1), path)
            if m.bias is not None:
                put(m.bias, arrays["bias"], path)
        elif isinstance(m, nn.Linear):
            put(m.weight, arrays["kernel"].T, path)
            if m.bias is not None:
                put(m.bias, arrays["bias"], path)
        elif isinstance(m, nn.PReLU):
            put(m.weight, arrays["negative_slope"], path)
        else:
            norm = m.bn if isinstance(m, FeatureBN) else m
            if norm.weight is not None:
                put(norm.weight, arrays["scale"], path)
            put(m.bias if isinstance(m, FeatureBN) and m.bias is not None else norm.bias,
                arrays["bias"], path)  # fmt: skip
            put(norm.running_mean, arrays["mean"], path)
            put(norm.running_var, arrays["var"], path)


def num_params(peer: nn.Module) -> int:
    return sum(p.numel() for p in peer.parameters())


__all__: Sequence[str] = [
    "PEERS",
    "copy_variables",
    "create_peer",
    "creation_order",
    "num_params",
    "semi_hard_triplet_loss",
]
