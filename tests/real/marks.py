"""Marks of the real-model tier."""

import os

import pytest

# What the default run leaves out to keep CI under its 30 minutes, each covered elsewhere (DPO's
# parity across backends to 1e-5 on the tiny model, the sweep end to end on it): MLXFT_REAL_ALL=1 runs them.
extended = pytest.mark.skipif(not os.environ.get("MLXFT_REAL_ALL"),
                              reason="extended real-model tier: set MLXFT_REAL_ALL=1 to run it")
