import torch

from trainables.model import cifar_resnet18


def test_cifar_resnet18_shape_and_size():
    model = cifar_resnet18()
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # 11.17 M
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    out = model.eval()(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)
