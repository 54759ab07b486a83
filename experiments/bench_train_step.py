"""Train-step throughput on one device: facenet_jax next to the same network in PyTorch.

    python experiments/bench_train_step.py                        # docs/bench_train_step.md
    python experiments/bench_train_step.py --rows small_cnn:64:16 resnet18:112:64 --steps 5
    python experiments/bench_train_step.py --rows small_cnn:64:16 --old-layers  # before issue 12
    python experiments/bench_train_step.py --rows resnet18:112:64 --breakdown    # where time goes
    python experiments/bench_train_step.py --ops                                 # per-op timings

Each row (``model:image_size:width[:pooling]``, default pooling avg) builds, in this process:

* ours: ``train.make_train_step`` exactly as training runs it: ``shard_map`` over a 1-device
  mesh, global semi-hard mining (all-gather, psum), the non-finite guard, metrics, Adam;
* ours, plain jit: the same model, loss (``losses.triplet_terms``, semi-hard) and optimiser in one
  ``jax.jit`` with no shard_map, collectives, guard or metrics: their overhead is the difference;
* PyTorch: the twin from ``experiments/torch_peers.py`` (same layers, padding, parameter count;
  its weights are copied from ours and its embeddings checked equal to ours before timing), the
  same semi-hard loss (``torch_peers.semi_hard_triplet_loss``, checked equal to ours) and
  ``torch.optim.Adam``. PyTorch runs NCHW, its native layout; ours NHWC. (pytorch-metric-learning's
  semi-hard miner builds every triplet: 0.37 s of a 1.5 s step here, so it is not used.)

Batch 128 = P 16 x K 8 random images in [-1, 1], the same for all; ``--warmup`` untimed steps
each (compilation included there), then ``--steps`` rounds in which the three run one step each,
in turn (after a 0.3 s pause each, ``COOLDOWN_S``, so that neither runtime's idle-spinning
threads slow the other), so a change of machine load hits all three alike; the table reports
median images/s and ours / PyTorch for each. The machine's load average is printed with every
row (the ratio measured in the same run is what counts on a shared machine).
``--old-layers`` swaps the backbones' ``layers.Conv`` / ``layers.max_pool`` for ``nn.Conv`` /
``nn.max_pool`` (the state before issue 12).
``--breakdown`` times, for ours and PyTorch alike, the forward pass alone (training
mode: batch statistics), forward + backward (gradient of a fixed linear function of the
embeddings, no loss, no optimiser) and the whole step, so the table shows which part holds a gap.
``--ops`` times single operations at shapes of the 64x64 small CNN (batch 128): a 3x3
convolution's forward pass, its input gradient and its kernel gradient (XLA's backward-filter
convolution, ``nn.Conv``'s, next to ``layers.conv_kernel_grad``'s matrix products), and the 2x2
max-pool gradient (``select_and_scatter`` next to ``layers.max_pool``'s mask), each with PyTorch's
same op. The PyTorch twin needs the ``bench`` extra: ``pip install -e .[bench]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO, os.path.join(REPO, "experiments")):
    if path not in sys.path:
        sys.path.insert(0, path)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from configs import default  # noqa: E402
from facenet_jax import losses, models, parallel, train  # noqa: E402
from facenet_jax.train_state import TrainState, create_optimizer  # noqa: E402

# (model, image size, width, pooling): the table's rows. Add a backbone here (and its twin to
# torch_peers.PEERS).
ROWS = [
    ("small_cnn", 32, 16, "avg"),
    ("small_cnn", 64, 16, "avg"),
    ("small_cnn", 64, 32, "avg"),
    ("resnet18", 64, 32, "avg"),
    ("resnet18", 112, 64, "avg"),
    ("mobilefacenet", 112, 64, "flatten"),
    ("ir18", 112, 64, "flatten"),
    ("inception_resnet_v1", 160, 32, "avg"),
]
P, K = 16, 8  # batch 128 = 16 identities x 8 images
# Pause before every timed call, a precaution: both runtimes keep worker threads spinning for a
# while after a parallel region (PyTorch's OpenMP pool, XLA's Eigen pool), and the op timed next
# should not share the 2 cores with them.
COOLDOWN_S = 0.3
MARGIN, LEARNING_RATE = 0.2, 1e-3


def parse_row(text: str) -> tuple[str, int, int, str]:
    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[0] not in models.MODELS:
        raise argparse.ArgumentTypeError(
            f"--rows: {text!r} is not model:image_size:width[:pooling] with model in "
            f"{list(models.MODELS)}"
        )
    return parts[0], int(parts[1]), int(parts[2]), parts[3] if len(parts) == 4 else "avg"


def row_config(name: str, size: int, width: int, pooling: str):
    config = default.get_config()
    config.model.name, config.model.width, config.model.pooling = name, width, pooling
    config.data.image_size, config.data.channels = size, 3
    config.data.identities_per_batch, config.data.images_per_identity = P, K
    t = config.train
    t.mining, t.mining_scope, t.margin, t.optimizer = "semi_hard", "global", MARGIN, "adam"
    t.schedule, t.learning_rate = "constant", LEARNING_RATE
    return config


@contextlib.contextmanager
def old_layers(enabled: bool):
    """Builds the backbones on nn.Conv / nn.max_pool while active (the pre-issue-12 layers)."""
    from facenet_jax.models import inception_resnet, iresnet, mobilefacenet, resnet, small_cnn

    saved = []
    if enabled:
        for module in (small_cnn, resnet, iresnet, mobilefacenet, inception_resnet):
            for attr, ref in (("Conv", nn.Conv), ("max_pool", nn.max_pool)):
                if hasattr(module, attr):
                    saved.append((module, attr, getattr(module, attr)))
                    setattr(module, attr, ref)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


# ----------------------------------------------------------------------------- the three steps


def ours_step(config, images, labels):
    """train.make_train_step on a 1-device mesh; returns (run one step, state, model)."""
    mesh = parallel.create_mesh(jax.devices()[:1])
    state = train.create_train_state(config, jax.random.key(0), images.shape[1:])
    state = parallel.replicate(state, mesh)
    step_fn = train.make_train_step(config, mesh)
    batch = parallel.shard_batch({"image": images, "label": labels}, mesh)
    box = [state]

    def run():
        box[0], metrics = step_fn(box[0], batch)
        jax.block_until_ready(metrics["loss"])

    return run, state


def plain_step(config, images, labels, params, batch_stats):
    """The same model, loss and optimiser in one jax.jit: no shard_map, collectives or guard."""
    model = models.create_model(config.model)
    state = TrainState.create(
        apply_fn=model.apply, params=params, batch_stats=batch_stats, tx=create_optimizer(config)
    )

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(state, images, labels):
        def loss_fn(params):
            emb, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            terms = losses.triplet_terms(emb, labels, strategy="semi_hard", margin=MARGIN)
            return terms.loss_sum / jnp.maximum(terms.count, 1), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss

    box = [state]
    images, labels = jnp.asarray(images), jnp.asarray(labels)

    def run():
        box[0], loss = step(box[0], images, labels)
        jax.block_until_ready(loss)

    return run


def torch_step(config, images, labels, variables):
    """The PyTorch twin with our initial weights; returns (run, parameter count, max |emb diff|)."""
    import torch
    import torch_peers

    m, size = config.model, config.data.image_size
    peer = torch_peers.create_peer(m.name, m.width, m.embedding_dim, m.pooling, size)
    order = torch_peers.creation_order(models.create_model(m), images.shape[1:])
    torch_peers.copy_variables(variables, order, peer)
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels.astype(np.int64))
    ours = models.create_model(m).apply(variables, images[:16], train=True, mutable=["batch_stats"])
    peer.train()
    with torch.no_grad():
        diff = float(np.abs(peer(x[:16]).numpy() - np.asarray(ours[0])).max())
    torch_peers.copy_variables(variables, order, peer)  # undo the running-statistics update
    probe = np.random.default_rng(1).normal(size=(len(labels), m.embedding_dim))
    probe = (probe / np.linalg.norm(probe, axis=1, keepdims=True)).astype(np.float32)
    ours_loss, _ = losses.semi_hard_triplet_loss(jnp.asarray(probe), jnp.asarray(labels), MARGIN)
    peer_loss = torch_peers.semi_hard_triplet_loss(torch.from_numpy(probe), y, MARGIN)
    np.testing.assert_allclose(float(peer_loss), float(ours_loss), rtol=1e-4)
    opt = torch.optim.Adam(peer.parameters(), lr=LEARNING_RATE)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = torch_peers.semi_hard_triplet_loss(peer(x), y, MARGIN)
        loss.backward()
        opt.step()

    return run, torch_peers.num_params(peer), diff


def breakdown_runs(config, images, variables):
    """{"fwd", "fwd+bwd"} x {ours, torch}: the network alone, without loss or optimiser."""
    import torch
    import torch_peers

    m, size = config.model, config.data.image_size
    model = models.create_model(m)
    probe = np.random.default_rng(2).normal(size=(len(images), m.embedding_dim)).astype(np.float32)
    x, w = jnp.asarray(images), jnp.asarray(probe)

    @jax.jit
    def fwd(variables, x):
        return model.apply(variables, x, train=True, mutable=["batch_stats"])[0]

    @jax.jit
    def fwd_bwd(variables, x):
        def f(params):
            emb, _ = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(emb * w)

        return jax.grad(f)(variables["params"])

    variables = jax.device_put(variables)
    peer = torch_peers.create_peer(m.name, m.width, m.embedding_dim, m.pooling, size)
    torch_peers.copy_variables(variables, torch_peers.creation_order(model, images.shape[1:]), peer)
    peer.train()
    tx = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    tw = torch.from_numpy(probe)

    def torch_fwd():
        with torch.no_grad():
            peer(tx)

    def torch_fwd_bwd():
        peer.zero_grad(set_to_none=True)
        (peer(tx) * tw).sum().backward()

    return {
        "ours fwd": lambda: jax.block_until_ready(fwd(variables, x)),
        "torch fwd": torch_fwd,
        "ours fwd+bwd": lambda: jax.block_until_ready(fwd_bwd(variables, x)),
        "torch fwd+bwd": torch_fwd_bwd,
    }


# (batch, side, in channels, out channels): the 3x3 convolutions of small_cnn width 16 at 64x64.
OP_SHAPES = [(128, 64, 16, 16), (128, 32, 32, 32), (128, 16, 64, 64)]


def op_runs(shape) -> dict:
    """{op name: (ours, torch)}: zero-argument callables that run the op once, synchronously."""
    import torch

    from facenet_jax.models import layers

    b, side, cin, cout = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, side, side, cin)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(3, 3, cin, cout)).astype(np.float32) * 0.1)
    g = jnp.asarray(rng.normal(size=(b, side, side, cout)).astype(np.float32))
    pads, one = ((1, 1), (1, 1)), (1, 1)
    dn = ("NHWC", "HWIO", "NHWC")

    def xla_conv(x, k):
        return lax.conv_general_dilated(x, k, one, pads, dimension_numbers=dn)

    fwd = jax.jit(xla_conv)
    dx = jax.jit(lambda x, k, g: jax.vjp(lambda x: xla_conv(x, k), x)[1](g)[0])
    dk_xla = jax.jit(lambda x, k, g: jax.vjp(lambda k: xla_conv(x, k), k)[1](g)[0])
    dk_ours = jax.jit(lambda x, g: layers.conv_kernel_grad(x, g, (3, 3, cin, cout), one, pads))
    gp = g[:, ::2, ::2]
    pool_xla = jax.jit(lambda x, g: jax.vjp(lambda x: nn.max_pool(x, (2, 2), (2, 2)), x)[1](g)[0])
    pool_ours = jax.jit(
        lambda x, g: jax.vjp(lambda x: layers.max_pool(x, (2, 2), (2, 2)), x)[1](g)[0]
    )
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    tk = torch.from_numpy(np.asarray(k).transpose(3, 2, 0, 1).copy())
    tg = torch.from_numpy(np.asarray(g).transpose(0, 3, 1, 2).copy())
    tgx = torch.from_numpy(np.asarray(g)[..., :cin].transpose(0, 3, 1, 2).copy())
    tgp = tgx[:, :, ::2, ::2].contiguous()
    grad = torch.nn.grad

    def torch_pool_grad():
        xr = tx.clone().requires_grad_(True)
        torch.nn.functional.max_pool2d(xr, 2, 2).backward(tgp)

    def ready(f, *a):
        return lambda: jax.block_until_ready(f(*a))

    with torch.no_grad():
        return {
            "conv forward": (
                ready(fwd, x, k),
                lambda: torch.nn.functional.conv2d(tx, tk, None, 1, 1),
            ),
            "conv input gradient": (
                ready(dx, x, k, g),
                lambda: grad.conv2d_input(tx.shape, tk, tg, 1, 1),
            ),
            "conv kernel gradient, XLA backward-filter (nn.Conv)": (
                ready(dk_xla, x, k, g),
                lambda: grad.conv2d_weight(tx, tk.shape, tg, 1, 1),
            ),
            "conv kernel gradient, matrix products (layers.Conv)": (
                ready(dk_ours, x, g),
                lambda: grad.conv2d_weight(tx, tk.shape, tg, 1, 1),
            ),
            "2x2 max-pool gradient, select_and_scatter (nn.max_pool)": (
                ready(pool_xla, x, g[:, ::2, ::2, :cin]),
                torch_pool_grad,
            ),
            "2x2 max-pool gradient, first-maximum mask (layers.max_pool)": (
                ready(pool_ours, x, gp[..., :cin]),
                torch_pool_grad,
            ),
        }


# (batch, side, channels, stride): depthwise 3x3 convolutions of MobileFaceNet at 112x112
# (width 64: the first depthwise layer; a stride-2 bottleneck entry; an expanded 14x14 block).
DEPTHWISE_SHAPES = [(128, 56, 64, 1), (128, 56, 128, 2), (128, 14, 256, 1)]


def depthwise_op_runs(shape) -> dict:
    """{op name: (ours, torch)}: a depthwise conv's forward and both gradients in one call."""
    import torch

    from facenet_jax.models import layers

    b, side, c, stride = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, side, side, c)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(3, 3, 1, c)).astype(np.float32) * 0.1)
    strides, pads = (stride, stride), ((1, 1), (1, 1))
    out = (side + 2 - 3) // stride + 1
    g = jnp.asarray(rng.normal(size=(b, out, out, c)).astype(np.float32))

    def lax_conv(x, k):
        return lax.conv_general_dilated(
            x, k, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c
        )

    def both(conv):
        def run(x, k, g):
            y, vjp = jax.vjp(conv, x, k)
            return y, *vjp(g)

        return jax.jit(run)

    ours = both(lambda x, k: layers.depthwise_conv2d(x, k, strides, pads))
    xla = both(lax_conv)
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    tk = torch.from_numpy(np.asarray(k).transpose(3, 2, 0, 1).copy())
    tg = torch.from_numpy(np.asarray(g).transpose(0, 3, 1, 2).copy())

    def torch_both():
        xr, kr = tx.clone().requires_grad_(True), tk.clone().requires_grad_(True)
        torch.nn.functional.conv2d(xr, kr, None, stride, 1, 1, c).backward(tg)

    return {
        "depthwise conv forward + both gradients, lax grouped conv (nn.Conv)": (
            lambda: jax.block_until_ready(xla(x, k, g)),
            torch_both,
        ),
        "depthwise conv forward + both gradients, tap sums (layers.Conv)": (
            lambda: jax.block_until_ready(ours(x, k, g)),
            torch_both,
        ),
    }


def measure_ops(steps: int, warmup: int) -> None:
    """Prints a table of median milliseconds per op, ours next to PyTorch's, interleaved."""
    print()
    print("| op | input [B, H, W, C] -> C_out | ours ms | PyTorch ms | PyTorch / ours (speed) |")
    print("|---|---|---|---|---|")
    cases = [
        (f"[{b}, {h}, {h}, {ci}] -> {co}", op_runs((b, h, ci, co))) for b, h, ci, co in OP_SHAPES
    ]
    cases += [
        (f"[{b}, {h}, {h}, {c}] -> {c}, stride {st}", depthwise_op_runs((b, h, c, st)))
        for b, h, c, st in DEPTHWISE_SHAPES
    ]
    for shape_text, runs in cases:
        for name, (ours, peer) in runs.items():
            for _ in range(warmup):
                ours(), peer()
            times = {"ours": [], "torch": []}
            for _ in range(steps):
                for key, run in (("ours", ours), ("torch", peer)):
                    time.sleep(COOLDOWN_S)
                    start = time.perf_counter()
                    run()
                    times[key].append(time.perf_counter() - start)
            ms = {key: 1e3 * float(np.median(t)) for key, t in times.items()}
            print(
                f"| {name} | {shape_text} | {ms['ours']:.1f} | "
                f"{ms['torch']:.1f} | {ms['torch'] / ms['ours']:.2f} |",
                flush=True,
            )


# ----------------------------------------------------------------------------- measurement


def measure_row(row, steps: int, warmup: int, old: bool, breakdown: bool = False) -> dict:
    name, size, width, pooling = row
    config = row_config(name, size, width, pooling)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (P * K, size, size, 3)).astype(np.float32)
    labels = np.repeat(np.arange(P, dtype=np.int32), K)
    with old_layers(old):
        ours, state = ours_step(config, images, labels)
        variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
        plain = plain_step(config, images, labels, variables["params"], variables["batch_stats"])
        peer, n_peer, diff = torch_step(config, images, labels, variables)
        runs = {"ours": ours, "plain": plain, "torch": peer}
        if breakdown:
            runs.update(breakdown_runs(config, images, variables))
        compile_s = {}
        for key, run in runs.items():
            start = time.perf_counter()
            for _ in range(warmup):
                run()
            compile_s[key] = time.perf_counter() - start
        load = [os.getloadavg()[0]]
        times = {key: [] for key in runs}
        for _ in range(steps):
            for key, run in runs.items():
                time.sleep(COOLDOWN_S)
                start = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - start)
        load.append(os.getloadavg()[0])
    ips = {key: P * K / float(np.median(t)) for key, t in times.items()}
    return dict(
        row=row,
        params=sum(int(np.size(a)) for a in jax.tree.leaves(variables["params"])),
        peer_params=n_peer,
        diff=diff,
        ips=ips,
        load=load,
        warmup_s=compile_s,
    )


def print_header() -> None:
    print(
        "| model | input | width | pooling | params (ours = PyTorch) | max abs emb diff | "
        "ours img/s | plain jit img/s | PyTorch img/s | ours / PyTorch | plain / PyTorch | "
        "load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")


def print_row(r: dict) -> None:
    name, size, width, pooling = r["row"]
    same = "=" if r["params"] == r["peer_params"] else "!="
    ips = r["ips"]
    print(
        f"| {name} | {size}x{size}x3 | {width} | {pooling} | "
        f"{r['params']:,} {same} {r['peer_params']:,} | {r['diff']:.1e} | "
        f"{ips['ours']:,.1f} | {ips['plain']:,.1f} | {ips['torch']:,.1f} | "
        f"{ips['ours'] / ips['torch']:.2f} | {ips['plain'] / ips['torch']:.2f} | "
        f"{r['load'][0]:.1f} -> {r['load'][1]:.1f} |",
        flush=True,
    )


def print_breakdown(results: list[dict]) -> None:
    """Milliseconds per batch of 128: forward, forward + backward, whole step, each side."""
    print()
    print("| model | input | width | part | ours ms | PyTorch ms | ours / PyTorch (speed) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        name, size, width, _ = r["row"]
        ms = {key: P * K / ips * 1e3 for key, ips in r["ips"].items()}
        for part, ours, peer in (
            ("forward (train mode)", "ours fwd", "torch fwd"),
            ("forward + backward", "ours fwd+bwd", "torch fwd+bwd"),
            ("whole step (loss, Adam)", "ours", "torch"),
        ):
            print(
                f"| {name} | {size}x{size}x3 | {width} | {part} | {ms[ours]:,.0f} | "
                f"{ms[peer]:,.0f} | {ms[peer] / ms[ours]:.2f} |"
            )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rows", nargs="+", type=parse_row, default=ROWS, help="model:image_size:width[:pooling]"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps each (compiles)")
    parser.add_argument(
        "--old-layers", action="store_true", help="nn.Conv / nn.max_pool (before issue 12)"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="also time forward and forward+backward alone"
    )
    parser.add_argument("--ops", action="store_true", help="only the per-op table (OP_SHAPES)")
    args = parser.parse_args(argv)
    import torch

    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, layers: "
        f"{'nn.Conv / nn.max_pool' if args.old_layers else 'layers.Conv / layers.max_pool'}"
    )
    print(f"uptime: {os.popen('uptime').read().strip()}")
    if args.ops:
        measure_ops(max(args.steps, 10), args.warmup)
        print(f"uptime: {os.popen('uptime').read().strip()}")
        return
    print_header()
    results = []
    for row in args.rows:
        results.append(measure_row(row, args.steps, args.warmup, args.old_layers, args.breakdown))
        print_row(results[-1])
    if args.breakdown:
        print_breakdown(results)
    print(f"uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
