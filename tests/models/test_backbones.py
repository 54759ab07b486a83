"""Face backbones: published parameter counts, geometry, 64x64 CPU variants, bf16, synchronised BN.

Parameter counts and shapes come from ``jax.eval_shape`` (no compilation); anything that runs
uses reduced depths at tiny widths, because compiling the full-depth networks takes minutes on
the 2-core CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from facenet_jax import models
from facenet_jax.models.mobilefacenet import MobileFaceNet

FACE_MODELS = ["inception_resnet_v1", "mobilefacenet", "ir18", "ir34", "ir50"]

# Reduced depths (same block types) that compile in seconds.
SMALL = {
    "inception_resnet_v1": functools.partial(models.InceptionResNetV1, repeats=(1, 1, 0)),
    "mobilefacenet": functools.partial(MobileFaceNet, bottlenecks=((2, 64, 2, 2), (4, 128, 1, 2))),
    "ir": functools.partial(models.IResNet, stage_sizes=(1, 2, 1, 1)),
}


def _shapes(model, size, batch=2):
    init = functools.partial(model.init, train=False)
    return jax.eval_shape(init, jax.random.key(0), jnp.zeros((batch, size, size, 3)))


def _num_params(variables) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


# (name, kwargs, input size, reference count, where the reference comes from)
PUBLISHED = [
    (
        "inception_resnet_v1",
        dict(width=32, embedding_dim=128, pooling="avg"),
        160,
        22_793_728,
        # facenet-pytorch InceptionResnetV1 (davidsandberg's model): 27,910,327 with its
        # 8,631-class VGGFace2 logits (8631 * 513) and a 512-d bottleneck; at 128-d the FC and
        # its BN shrink by 384 * (1792 + 2): 27,910,327 - 4,427,703 - 688,896.
        "facenet-pytorch models/inception_resnet_v1.py",
    ),
    (
        "inception_resnet_v1",
        dict(width=32, embedding_dim=512, pooling="avg"),
        160,
        27_910_327 - 8631 * 513,
        "facenet-pytorch InceptionResnetV1(pretrained='vggface2') minus its logits layer",
    ),
    (
        # Chen et al. 2018, Table 2: 0.99M. The TreB1eN/InsightFace_Pytorch MobileFaceNet(128)
        # that follows Table 1 has 1,003,136 (+1.3%; the paper rounds or omits some BN terms).
        "mobilefacenet",
        dict(width=64, embedding_dim=128, pooling="flatten"),
        112,
        1_003_136,
        "TreB1eN/InsightFace_Pytorch model.py MobileFaceNet(128); paper 0.99M",
    ),
    # insightface recognition/arcface_torch iresnet{18,34,50}(num_features=512) at 112x112:
    # 24,025,600 / 34,139,328 / 43,590,848 (its model table); those include the 512 scales of the
    # final BatchNorm1d, which insightface freezes at 1 and we omit (use_scale=False).
    (
        "ir18",
        dict(width=64, embedding_dim=512, pooling="flatten"),
        112,
        24_025_600 - 512,
        "arcface_torch iresnet18",
    ),
    (
        "ir34",
        dict(width=64, embedding_dim=512, pooling="flatten"),
        112,
        34_139_328 - 512,
        "arcface_torch iresnet34",
    ),
    (
        "ir50",
        dict(width=64, embedding_dim=512, pooling="flatten"),
        112,
        43_590_848 - 512,
        "arcface_torch iresnet50",
    ),
]


@pytest.mark.parametrize("name,kwargs,size,want,source", PUBLISHED)
def test_published_parameter_counts(name, kwargs, size, want, source):
    got = _num_params(_shapes(models.MODELS[name](**kwargs), size))
    assert got == want, f"{name}: {got} parameters, reference {want} ({source})"
    if name == "mobilefacenet":
        assert abs(got / 0.99e6 - 1) < 0.015  # the paper's 0.99M


@pytest.mark.parametrize(
    "name,kwargs,size,param,shape",
    [
        # VALID geometry at 160: a 3x3x1792 last map (FaceNet's), 2x2 with SAME at 64.
        ("inception_resnet_v1", dict(width=4, pooling="flatten"), 160, "bottleneck", 9 * 224),
        ("inception_resnet_v1", dict(width=4, pooling="flatten"), 64, "bottleneck", 4 * 224),
        ("ir18", dict(width=4, pooling="flatten"), 112, "fc", 7 * 7 * 32),
        ("ir18", dict(width=4, pooling="flatten"), 64, "fc", 4 * 4 * 32),
        ("mobilefacenet", dict(width=8, pooling="flatten"), 112, "gdconv", 7 * 7),
        ("mobilefacenet", dict(width=8, pooling="flatten"), 64, "gdconv", 4 * 4),
    ],
)
def test_last_map_geometry(name, kwargs, size, param, shape):
    params = _shapes(models.MODELS[name](embedding_dim=8, **kwargs), size)["params"]
    kernel = params[param]["kernel"].shape
    assert (kernel[0] if param != "gdconv" else kernel[0] * kernel[1]) == shape, kernel


@pytest.mark.parametrize("name", FACE_MODELS)
@pytest.mark.parametrize("pooling", ["avg", "flatten"])
def test_full_depth_builds_from_config_at_64x64(name, pooling):
    cfg = default.get_config().model
    cfg.name, cfg.width, cfg.embedding_dim, cfg.pooling = name, 4, 24, pooling
    model = models.create_model(cfg, bn_axis_name="data")
    assert model.bn_axis_name == "data"
    out = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False), _shapes(model, 64), jnp.zeros((3, 64, 64, 3))
    )
    assert out.shape == (3, 24) and out.dtype == jnp.float32


@pytest.mark.parametrize("family", sorted(SMALL))
def test_small_variant_trains_at_64x64(family):
    """Train and eval mode: unit-norm float32 embeddings, finite non-zero gradients, BN updates."""
    model = SMALL[family](width=4 if family != "mobilefacenet" else 8, embedding_dim=16)
    x = jax.random.normal(jax.random.key(0), (4, 64, 64, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), x)

    @jax.jit
    def step(variables, x):
        def loss(params):
            emb, upd = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(emb[0] * emb[1]), (emb, upd)

        (_, (emb, upd)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        return emb, upd, grads, model.apply(variables, x, train=False)

    emb, updates, grads, emb_eval = step(variables, x)
    for e in (emb, emb_eval):
        assert e.shape == (4, 16) and e.dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
    old, new = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(updates["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(old, new, strict=True))


@pytest.mark.parametrize("family", sorted(SMALL))
def test_bfloat16_compute_keeps_float32_params(family):
    model = SMALL[family](width=4, embedding_dim=8, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    emb = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    assert emb.dtype == jnp.float32 and np.all(np.isfinite(emb))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_synchronised_batchnorm_under_shard_map_equals_one_device(family):
    """8 devices x 2 images with ``bn_axis_name``: embeddings and running statistics equal the
    one-device result on all 16 images (batch statistics are psum-ed over the data axis)."""
    n_dev = 8
    if jax.device_count() < n_dev:
        pytest.skip("needs 8 (fake) devices, see tests/conftest.py")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    kw = dict(width=4, embedding_dim=8)
    synced, single = SMALL[family](bn_axis_name="data", **kw), SMALL[family](**kw)
    x = jax.random.normal(jax.random.key(0), (2 * n_dev, 64, 64, 3))
    variables = jax.jit(functools.partial(single.init, train=False))(jax.random.key(1), x)

    def device_apply(variables, x_local):
        return synced.apply(variables, x_local, train=True, mutable=["batch_stats"])

    mesh = jax.make_mesh((n_dev,), ("data",), devices=jax.devices()[:n_dev])
    step = jax.jit(
        jax.shard_map(
            device_apply, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P())
        )
    )
    emb, updates = step(variables, jax.device_put(x, NamedSharding(mesh, P("data"))))
    want_emb, want_updates = jax.jit(
        functools.partial(single.apply, train=True, mutable=["batch_stats"])
    )(variables, x)
    np.testing.assert_allclose(emb, want_emb, rtol=2e-4, atol=2e-5)
    for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(want_updates), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("name", ["inception_resnet_v1", "mobilefacenet", "ir18"])
def test_unknown_pooling_raises(name):
    with pytest.raises(ValueError, match="pooling.*allowed"):
        _shapes(models.MODELS[name](width=4, embedding_dim=8, pooling="max"), 64)
