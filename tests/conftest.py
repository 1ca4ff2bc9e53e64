"""Test defaults: run JAX on CPU unless the caller chose a platform."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
