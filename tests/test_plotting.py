"""smaso.plotting: the book's figure check fails on each thing that keeps a figure from
reading at 1x, and passes a figure drawn in the book's style; every arm has a name."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest

from smaso import plotting
from smaso.models import ACTIVATIONS


@pytest.fixture(autouse=True)
def _style():
    with matplotlib.rc_context():
        plotting.use_style()
        yield
    plt.close("all")


def _good():
    fig, (a, b) = plt.subplots(1, 2)
    a.plot([0, 1], [0, 1], label=plotting.name("bvq-maxout3"))
    a.set(xlabel="epoch", ylabel="accuracy")
    a.legend()
    im = b.imshow(np.eye(3))
    b.set(xlabel="filter i", ylabel="filter j")
    fig.colorbar(im, ax=b, label="cos²")
    return fig, a, b


def test_a_figure_in_the_style_passes():
    fig, _, _ = _good()
    assert plotting.figure_problems(fig) == []
    plotting.check_figure(fig)


@pytest.mark.parametrize(
    "spoil, expected",
    [
        (lambda fig, a, b: fig.set_figwidth(13), "in wide"),
        (lambda fig, a, b: a.set_xlabel(""), "x tick labels but no label"),
        (lambda fig, a, b: a.legend(fontsize=7), "7 pt"),
        (lambda fig, a, b: a.legend(["gini-relu"]), "code name"),
        (lambda fig, a, b: b.imshow(np.ones((3, 3))), "without a colour bar"),
    ],
    ids=["wide", "no-label", "small-font", "code-name", "no-colour-bar"],
)
def test_each_problem_is_found(spoil, expected):
    fig, a, b = _good()
    spoil(fig, a, b)
    problems = plotting.figure_problems(fig)
    assert any(expected in p for p in problems), problems
    with pytest.raises(AssertionError, match="does not read at 1x"):
        plotting.check_figure(fig)


def test_an_rgb_image_needs_no_colour_bar():
    fig, ax = plt.subplots()
    ax.imshow(np.zeros((4, 4, 3)))
    ax.set(xlabel="$z_1$", ylabel="$z_2$")
    assert plotting.figure_problems(fig) == []


def test_every_activation_has_a_display_name():
    for key in ACTIVATIONS:
        assert not plotting.is_code_name(plotting.name(key)), key


def test_a_missing_name_says_where_to_add_it():
    with pytest.raises(KeyError, match=r"smaso\.plotting\.NAMES"):
        plotting.name("no-such-arm")
