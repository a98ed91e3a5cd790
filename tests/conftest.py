import pytest
import torch

import timm_ssb  # noqa: F401  (registers the models)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
