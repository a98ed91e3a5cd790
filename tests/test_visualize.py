import pytest
import timm
import torch
from PIL import Image

from timm_ssb.cli import main
from timm_ssb.visualize import (
    DPI,
    PANEL_INCHES,
    layer_views,
    layer_views_figure,
    parse_layers,
    plot_layer_views,
    ssb_layer,
)

LAYERS = ['2-2', '3-2', '4-2']


def _inputs(size=128):
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    image = torch.rand(3, size, size)
    return x, image


def test_zero_saliency_gives_the_uniform_picture_exactly():
    model = timm.create_model('ssb_resnetd26', ssb_sizes=(8, 4, 2))
    x, image = _inputs()
    views = layer_views(model, x, image, LAYERS)
    for view in views.values():
        assert torch.equal(view.adaptive_y, view.uniform_y) and torch.equal(view.adaptive_x, view.uniform_x)
        assert torch.equal(view.adaptive_picture, view.uniform_picture)
        torch.testing.assert_close(view.saliency, torch.full_like(view.saliency, 1 / view.saliency.numel()))


def test_learned_saliency_moves_samples_and_picture():
    model = timm.create_model('ssb_resnetd26', ssb_sizes=(8, 4, 2))
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.out_channels == 1:
            torch.nn.init.normal_(m.weight, std=0.5)
    x, image = _inputs()
    view = layer_views(model, x, image, ['2-2'])['2-2']
    assert view.saliency.shape == (16, 16) and float(view.saliency.sum()) == pytest.approx(1.0, abs=1e-5)
    assert view.adaptive_picture.shape == view.uniform_picture.shape == (3, 8, 8)
    assert not torch.equal(view.adaptive_y, view.uniform_y)
    assert not torch.equal(view.adaptive_picture, view.uniform_picture)
    assert ((view.adaptive_y >= 0) & (view.adaptive_y <= 1)).all()


def test_picture_of_a_constant_image_is_constant():
    model = timm.create_model('ssb_resnetd26', ssb_sizes=(8, 4, 2))
    x, _ = _inputs()
    image = torch.tensor([0.2, 0.5, 0.9]).view(3, 1, 1).expand(3, 128, 128)
    view = layer_views(model, x, image, ['3-2'])['3-2']
    torch.testing.assert_close(view.adaptive_picture, torch.tensor([0.2, 0.5, 0.9]).view(3, 1, 1).expand(3, 4, 4))


def test_png_has_the_expected_size(tmp_path):
    model = timm.create_model('ssb_resnetd26', ssb_sizes=(8, 4, 2))
    x, image = _inputs()
    out = tmp_path / 'views.png'
    plot_layer_views(image, layer_views(model, x, image, LAYERS), str(out))
    assert Image.open(out).size == (round(5 * PANEL_INCHES * DPI), round(3 * PANEL_INCHES * DPI))


def test_layer_names():
    assert parse_layers('2-7, 3-10,4-3') == ['2-7', '3-10', '4-3']
    with pytest.raises(ValueError, match='STAGE-BLOCK'):
        parse_layers('layer3.1')
    model = timm.create_model('ssb_resnetd50', device='meta')
    assert ssb_layer(model, '3-6') is model.layer3[5]
    with pytest.raises(ValueError, match='is not an SSB block'):
        ssb_layer(model, '2-1')
    with pytest.raises(ValueError, match='is not an SSB block'):
        ssb_layer(model, '1-2')
    with pytest.raises(ValueError, match='does not exist'):
        ssb_layer(model, '4-4')


def test_cli_visualize_with_checkpoint(tmp_path, capsys):
    torch.manual_seed(1)
    model = timm.create_model('ssb_resnetd26', num_classes=3)
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'ckpt.pth')
    Image.new('RGB', (200, 150), (120, 30, 200)).save(tmp_path / 'img.png')
    out = tmp_path / 'viz.png'
    assert (
        main(
            [
                'visualize',
                str(tmp_path / 'img.png'),
                '--model',
                'ssb_resnetd26',
                '--checkpoint',
                str(tmp_path / 'ckpt.pth'),
                '--model-args',
                '{"num_classes": 3}',
                '--layers',
                '2-2,4-2',
                '--out',
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out).size == (1200, 480)
    assert "using weights from 'state_dict'" in capsys.readouterr().out
    with pytest.raises(SystemExit, match='is not an SSB block'):
        main(['visualize', str(tmp_path / 'img.png'), '--model', 'ssb_resnetd26', '--layers', '2-1', '--out', str(out)])


def test_saliency_panel_has_a_colour_bar_and_markers_have_a_rim():
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    model = timm.create_model('ssb_resnetd26', ssb_sizes=(8, 4, 2))
    x, image = _inputs()
    fig = layer_views_figure(image, layer_views(model, x, image, LAYERS))
    try:
        assert len(fig.axes) == 5 * len(LAYERS) + len(LAYERS)  # one colour bar per row
        saliency_panels = [ax for ax in fig.axes if ax.get_title().startswith('saliency')]
        assert len(saliency_panels) == len(LAYERS)
        assert all(ax.images[0].colorbar is not None for ax in saliency_panels)
        markers = [c for ax in fig.axes if 'samples' in ax.get_title() for c in ax.collections]
        assert len(markers) == 2 * len(LAYERS)
        for c in markers:  # a light face and a dark edge: one of them contrasts with any pixel
            face, edge = mcolors.rgb_to_hsv(c.get_facecolor()[0][:3]), mcolors.rgb_to_hsv(c.get_edgecolor()[0][:3])
            assert face[2] >= 0.9 and edge[2] <= 0.1 and c.get_linewidths()[0] > 0
    finally:
        plt.close(fig)


def test_picture_uses_the_samplers_own_kernel_width():
    x, image = _inputs()
    image = (torch.arange(128).view(1, 1, 128) // 16 % 2).float().expand(3, 128, 128)  # one stripe per sample
    sharp = timm.create_model('ssb_resnetd26', ssb_sizes=(8, 4, 2), ssb_sampler_args={'sigma_down': 0.002})
    wide = timm.create_model('ssb_resnetd26', ssb_sizes=(8, 4, 2), ssb_sampler_args={'sigma_down': 0.2})
    sharp_view = layer_views(sharp, x, image, ['2-2'])['2-2']
    wide_view = layer_views(wide, x, image, ['2-2'])['2-2']
    assert wide_view.uniform_picture.std() < 0.1  # a wide kernel averages the stripes away
    assert sharp_view.uniform_picture.std() > 0.45  # a narrow one reads each sample's stripe


def test_cli_visualize_errors_are_one_line(tmp_path):
    Image.new('RGB', (64, 64), (10, 200, 30)).save(tmp_path / 'img.png')
    img = str(tmp_path / 'img.png')
    out = str(tmp_path / 'v.png')
    with pytest.raises(SystemExit, match=r"--model must be one of ssb_.*; got 'resnet50d'"):
        main(['visualize', img, '--model', 'resnet50d', '--out', out])
    with pytest.raises(SystemExit, match=r"the folder '.*missing' does not exist"):
        main(['visualize', img, '--model', 'ssb_resnetd26', '--out', str(tmp_path / 'missing' / 'v.png')])
    torch.save(timm.create_model('resnet26d').state_dict(), tmp_path / 'other.pth')
    with pytest.raises(SystemExit) as exc:
        main(['visualize', img, '--model', 'ssb_resnetd26', '--checkpoint', str(tmp_path / 'other.pth'), '--out', out])
    message = str(exc.value)
    assert 'does not fit ssb_resnetd26' in message and 'missing keys: layer2.1.sampler.saliency.bias' in message
    assert message.count('\n') == 0 and len(message) < 600
