"""Every config file: loads, passes validation, and only overrides fields the default has."""

import importlib
import pathlib

import pytest

from configs import default
from facenet_jax import train

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
NAMES = sorted(p.stem for p in CONFIGS.glob("*.py") if p.stem != "__init__")


def _keys(config, prefix=""):
    out = set()
    for k, v in config.items():
        out |= _keys(v, f"{prefix}{k}.") if hasattr(v, "items") else {prefix + k}
    return out


def test_every_config_file_is_found():
    assert {"default", "smoke", "digits", "bfw", "tpu"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_validates_and_adds_no_unknown_field(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    train.validate_config(config)
    # A misspelt override (e.g. data.image_szie) would silently add a field nobody reads.
    assert _keys(config) == _keys(default.get_config())
