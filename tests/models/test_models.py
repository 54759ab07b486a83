import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from facenet_jax import models
from facenet_jax.models import inception_resnet, iresnet, mobilefacenet, resnet, small_cnn


@pytest.mark.parametrize(
    "name,pooling", [("small_cnn", "avg"), ("small_cnn", "flatten"), ("resnet10", "avg")]
)
def test_output_shape_and_unit_norm(name, pooling):
    cfg = default.get_config().model
    cfg.name, cfg.width, cfg.embedding_dim, cfg.pooling = name, 8, 24, pooling
    model = models.create_model(cfg)
    x = jax.random.normal(jax.random.key(0), (5, 16, 16, 3))
    variables = model.init(jax.random.key(1), x, train=False)
    assert "batch_stats" in variables
    for train in (False, True):
        out = model.apply(variables, x, train=train, mutable=["batch_stats"] if train else False)
        emb = out[0] if train else out
        assert emb.shape == (5, 24) and emb.dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_unit_norm():
    cfg = default.get_config().model
    cfg.width, cfg.embedding_dim, cfg.dtype = 8, 16, "bfloat16"
    model = models.create_model(cfg)
    x = jnp.ones((2, 16, 16, 1))
    variables = model.init(jax.random.key(0), x, train=False)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    emb = model.apply(variables, x, train=False)
    assert emb.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_l2_normalize_zero_vector_has_finite_gradient():
    g = jax.grad(lambda x: models.l2_normalize(x).sum())(jnp.zeros((1, 4)))
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize(
    "field,value,match",
    [("name", "vgg99", "config.model.name"), ("dtype", "float8", "config.model.dtype")],
)
def test_bad_model_config_names_field_and_allowed_values(field, value, match):
    cfg = default.get_config().model
    cfg[field] = value
    with pytest.raises(ValueError, match=match) as e:
        models.create_model(cfg)
    assert "allowed" in str(e.value)


# (model, image size, width): the small-input and >= 96 px (7x7 stem + 3x3/2 max-pool) ResNet
# paths, and each face backbone at a size that runs in seconds.
FAST_LAYER_CASES = [
    ("small_cnn", 16, 8),
    ("resnet10", 16, 8),
    ("resnet10", 96, 4),
    ("ir18", 16, 8),
    ("mobilefacenet", 32, 8),
    ("inception_resnet_v1", 32, 4),
]


@pytest.mark.parametrize("name,size,width", FAST_LAYER_CASES)
def test_fast_layers_are_the_same_network_as_nn_conv_and_max_pool(monkeypatch, name, size, width):
    """layers.Conv / layers.max_pool against the same backbone built on nn.Conv / nn.max_pool:
    the same parameter tree (old checkpoints load), identical embeddings (equal within float32
    rounding where depthwise convs are tap sums), equal gradients."""
    cfg = default.get_config().model
    cfg.name, cfg.width, cfg.embedding_dim = name, width, 16
    model = models.create_model(cfg)
    x = jax.random.normal(jax.random.key(0), (4, size, size, 3))
    variables = model.init(jax.random.key(1), x, train=False)

    def loss(params, x):
        emb, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(jnp.sin(3.0 * emb)), emb

    (_, emb), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
    with monkeypatch.context() as m:
        for module in (small_cnn, resnet, iresnet, mobilefacenet, inception_resnet):
            m.setattr(module, "Conv", nn.Conv)
            if hasattr(module, "max_pool"):
                m.setattr(module, "max_pool", nn.max_pool)
        ref_variables = model.init(jax.random.key(1), x, train=False)
        (_, ref_emb), ref_grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            variables["params"], x
        )
    assert jax.tree.structure(ref_variables) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(ref_variables), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)
    if name == "mobilefacenet":  # Depthwise convs are tap sums: another summation order.
        np.testing.assert_allclose(emb, ref_emb, rtol=1e-4, atol=1e-5)
    else:  # Identical embeddings, bit for bit.
        np.testing.assert_array_equal(emb, ref_emb)
    # Depthwise tap sums round differently, and MobileFaceNet's BN biases in front of the next
    # BN (residual sum, then re-normalised) have exactly zero gradient in exact arithmetic: both
    # networks give only float32 noise there, so those are compared on the largest gradient.
    largest = max(float(jnp.abs(b).max()) for b in jax.tree.leaves(ref_grads))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        scale = (largest if name == "mobilefacenet" else float(jnp.abs(b).max())) + 1e-12
        assert float(jnp.abs(a - b).max()) <= 1e-4 * scale, (a.shape, float(jnp.abs(a - b).max()))
