"""Shared test setup: quiet TF logs, deterministic seeds, data locations."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # pylint: disable=g-import-not-at-top

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(1234)
  yield
