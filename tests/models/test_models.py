import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from facenet_jax import models


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
