import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def cnn():
    """SmallResNet with randomised BatchNorm statistics (tests/models.py), eval mode."""
    from models import SmallResNet, randomize_bn

    torch.manual_seed(0)
    return randomize_bn(SmallResNet())


@pytest.fixture(scope="module")
def bert():
    """A 2-layer, hidden-64 Hugging Face BertModel with random weights (tests/models.py)."""
    from models import tiny_bert

    return tiny_bert()
