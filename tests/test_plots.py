"""The pictures: missing pixels in one colour, compare's panels kept apart, integer epochs."""
import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from ppl_lvm import plots


def test_missing_pixels_are_drawn_in_the_one_missing_colour(tmp_path):
    x = torch.rand(3, 16)
    mask = torch.rand(3, 16) > 0.5
    fig = plots.image_grid([x, x], tmp_path / "grid.png", missing=[None, mask])
    assert (tmp_path / "grid.png").stat().st_size > 0
    plain, masked = fig.axes[0].images[0].get_array(), fig.axes[3].images[0].get_array()
    assert np.allclose(plain, x[0].reshape(4, 4).numpy())
    pixels = np.asarray(masked)
    missing = ~mask[0].reshape(4, 4).numpy()
    assert np.allclose(pixels[missing], plots.MISSING_COLOR)
    grey = x[0].reshape(4, 4).numpy()[~missing]  # observed pixels keep their grey value
    assert np.allclose(pixels[~missing], np.stack([grey] * 3, -1), atol=0.01)


def test_compare_keeps_held_out_and_training_elbo_apart_with_integer_epochs():
    curves = {"runs/a": [{"epoch": e, "loss": 100.0 / e, "wall_time_s": e,
                          "heldout_elbo": -90.0 - 1 / e} for e in (1, 2, 3)],
              "runs/b": [{"epoch": e, "loss": 120.0 / e, "wall_time_s": 2 * e} for e in (1, 2)]}
    fig = plots.compare_curves(curves)
    held_out, training, by_time = fig.axes
    assert [line.get_label() for line in training.get_lines()] == ["runs/a", "runs/b"]
    assert np.allclose(training.get_lines()[0].get_ydata(), [-100.0, -50.0, -100.0 / 3])
    assert np.allclose(held_out.get_lines()[0].get_ydata(), [-91.0, -90.5, -90.0 - 1 / 3])
    for axis in (held_out, training, by_time):  # every line has a legend entry
        labels = [text.get_text() for text in axis.get_legend().get_texts()]
        assert len(labels) == len(axis.get_lines()) == 2
    assert "per-datapoint" in held_out.get_legend().get_texts()[1].get_text()
    for axis in (held_out, training):
        locator = axis.xaxis.get_major_locator()
        assert isinstance(locator, MaxNLocator) and locator._integer


def test_a_saved_completion_figure_paints_exactly_the_missing_pixels_in_the_missing_colour(tmp_path):
    """Read the PNG back: at the centre of every pixel of the "observed" row, a missing pixel is
    MISSING_COLOR (to the PNG's 8 bits) and an observed one its own grey; other rows have no mask."""
    import matplotlib.image

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 16, generator=generator) * 0.5  # greys far from the orange
    mask = torch.rand(2, 16, generator=generator) > 0.5
    path = tmp_path / "completions.png"
    fig = plots.completion_grid(x, mask, [x.flip(-1)], path, labels=["sample 1"], title="t")
    assert plots.MISSING_NAME in fig._suptitle.get_text()
    picture = matplotlib.image.imread(path)[..., :3]  # [H, W, 3] floats in [0, 1]
    height = picture.shape[0]
    expected = np.round(np.asarray(plots.MISSING_COLOR) * 255) / 255
    axes = np.asarray(fig.axes).reshape(3, 2)  # rows: original, observed, sample 1
    for row in range(3):
        for column in range(2):
            to_pixels = axes[row, column].transData
            for d in range(16):
                i, j = divmod(d, 4)
                px, py = to_pixels.transform((j, i))
                colour = picture[height - 1 - int(round(py)), int(round(px))]
                image = x[column] if row < 2 else x[column].flip(-1)
                if row == 1 and not mask[column, d]:
                    assert np.allclose(colour, expected, atol=1 / 255)
                else:
                    assert np.allclose(colour, [float(image[d])] * 3, atol=1.5 / 255)
