import pytest
import torch

from kd.errors import KDError
from kd.models import MODELS, create_model
from kd.data.text import TEXT_MODELS


@pytest.mark.parametrize("name", sorted(set(MODELS) - set(TEXT_MODELS)))  # text models: tests/test_text.py
def test_registered_models_map_inputs_to_class_logits(name):
    size = 8 if name in ("lenet", "mlp") else 32
    m = create_model(name, num_classes=7, in_channels=1, image_size=size).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 1, size, size))
    assert out.shape == (2, 7)


def test_library_models_by_name():
    m = create_model("timm:resnet10t", num_classes=5, in_channels=1, image_size=32).eval()
    assert m(torch.randn(1, 1, 32, 32)).shape == (1, 5)
    m = create_model("torchvision:mobilenet_v3_small", num_classes=4, in_channels=3).eval()
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_unknown_model_is_a_user_error():
    with pytest.raises(KDError, match="unknown model 'resnet9000'"):
        create_model("resnet9000", 10)
