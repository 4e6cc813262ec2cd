import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_cfg
from ddpmlab.errors import ConfigError
from ddpmlab.networks import UNet


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_ddpm_cifar10_unet_has_the_papers_35_7m_parameters(tmp_path):
    cfg = compose_cfg("train", ["model=unet_ddpm_cifar10", "data.image_size=32", "data.channels=3"], tmp_path)
    net = instantiate(cfg.model)
    assert n_params(net) == pytest.approx(35.7e6, rel=0.01)
    assert n_params(net) == 35_746_307  # the count of DDPM's TensorFlow model (Ho et al. 2020)


@pytest.mark.parametrize(
    "model,size,channels", [("unet_tiny", 8, 1), ("unet_small", 8, 1), ("unet_small", 28, 1), ("unet_small", 32, 3)]
)
def test_unet_configs_map_x_t_to_the_same_shape(tmp_path, model, size, channels):
    cfg = compose_cfg("train", [f"model={model}", f"data.image_size={size}", f"data.channels={channels}"], tmp_path)
    net = instantiate(cfg.model)
    if model == "unet_small":
        assert n_params(net) < 5e6  # "a few million at most"
    x = torch.randn(2, channels, size, size)
    out = net(x, torch.tensor([0, 999]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_attention_sits_at_the_configured_resolutions():
    net = UNet(
        in_channels=1, image_size=16, base_channels=16, channel_mult=(1, 2, 2), attn_resolutions=(8,), num_groups=8
    )
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-1]))
        for m in net.modules()
        if type(m).__name__ == "SelfAttention"
    ]
    net(torch.randn(1, 1, 16, 16), torch.tensor([5]))
    for h in hooks:
        h.remove()
    # 2 down blocks + 3 up blocks at 8x8, plus the middle at 4x4
    assert sorted(seen) == [4, 8, 8, 8, 8, 8]


def test_time_embedding_changes_the_output():
    torch.manual_seed(0)
    net = UNet(
        in_channels=1, image_size=8, base_channels=16, channel_mult=(1, 2), attn_resolutions=(), num_groups=8
    ).eval()
    x = torch.randn(1, 1, 8, 8)
    assert not torch.allclose(net(x, torch.tensor([1])), net(x, torch.tensor([900])))


def test_image_size_the_unet_cannot_halve_is_refused():
    with pytest.raises(ConfigError, match=r"image_size=28 .* multiple of 8"):
        UNet(in_channels=1, image_size=28, channel_mult=(1, 2, 2, 2))


def test_class_conditional_unet_uses_labels_and_a_null_label():
    torch.manual_seed(0)
    net = UNet(
        in_channels=1,
        image_size=8,
        base_channels=16,
        channel_mult=(1, 2),
        attn_resolutions=(),
        num_groups=8,
        num_classes=10,
    ).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 10])
    a, b = net(x, t, torch.tensor([3, 3])), net(x, t, torch.tensor([7, 7]))
    assert not torch.allclose(a, b)
    assert torch.allclose(net(x, t), net(x, t, torch.tensor([10, 10])))  # no labels = the null label
