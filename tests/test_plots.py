"""Plots people read: labels that do not overlap, one style per method, PNG and SVG."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from robustft.report import (
    LABEL_GID,
    METHOD_STYLES,
    id_vs_ood_figure,
    method_style,
    plot_id_vs_ood,
)

# The default run's summary (config.yaml, 3 seeds): lpft and wiseft lie 0.1 point apart.
DEFAULT_SUMMARY = pd.DataFrame(
    [
        ("lp", 0.918333, 0.000000, 0.867778, 0.000000),
        ("ft", 0.946667, 0.002094, 0.841852, 0.022549),
        ("lpft", 0.943056, 0.001828, 0.880370, 0.002906),
        ("l2sp", 0.933056, 0.002418, 0.824815, 0.004788),
        ("l1sp", 0.928611, 0.002996, 0.824815, 0.005788),
        ("kd", 0.928889, 0.002285, 0.872037, 0.002906),
        ("lora", 0.913889, 0.002285, 0.847407, 0.004729),
        ("wiseft", 0.942222, 0.002285, 0.879815, 0.006115),
    ],
    columns=["method", "id", "id_ci90", "ood", "ood_ci90"],
).assign(dataset="toyshift", backbone="toyresnet")


def label_boxes(fig):
    """(text, box in pixels) of every point label, as drawn."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [
        (text.get_text(), text.get_window_extent(renderer))
        for ax in fig.axes
        for text in ax.texts
        if text.get_gid() == LABEL_GID
    ]


def overlapping(boxes):
    return [
        (a, b)
        for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2)
        if box_a.overlaps(box_b)
    ]


def test_default_run_labels_do_not_overlap():
    fig = id_vs_ood_figure(DEFAULT_SUMMARY)
    boxes = label_boxes(fig)
    assert sorted(text for text, _ in boxes) == sorted(DEFAULT_SUMMARY["method"])
    assert overlapping(boxes) == []
    # Each label stays inside its panel.
    panel = fig.axes[0].get_window_extent()
    for text, box in boxes:
        assert panel.x0 <= box.x0 and box.x1 <= panel.x1, text
        assert panel.y0 <= box.y0 and box.y1 <= panel.y1, text


def test_points_too_crowded_for_labels_get_a_legend_not_overlapping_labels():
    rng = np.random.default_rng(0)
    methods = [*METHOD_STYLES, "my_method"]
    crowded = pd.DataFrame(
        {
            "dataset": "toy",
            "backbone": "net",
            "method": methods,
            "id": 0.9 + rng.normal(0, 0.001, len(methods)),
            "id_ci90": 0.001,
            "ood": 0.8 + rng.normal(0, 0.001, len(methods)),
            "ood_ci90": 0.001,
        }
    )
    fig = id_vs_ood_figure(crowded)
    assert overlapping(label_boxes(fig)) == []
    (ax,) = fig.axes
    if not label_boxes(fig):
        legend = ax.get_legend()
        assert [text.get_text() for text in legend.get_texts()] == methods


def test_a_method_has_one_style_everywhere():
    styles = [(style["color"], style["marker"]) for style in METHOD_STYLES.values()]
    assert len(set(styles)) == len(styles)
    assert len({color for color, _ in styles}) == len(styles)
    assert method_style("my_method") == method_style("my_method")
    fig = id_vs_ood_figure(DEFAULT_SUMMARY)
    for container in fig.axes[0].containers:  # one errorbar per method
        line = container.lines[0]
        assert line.get_color() == METHOD_STYLES[container.get_label()]["color"]
        assert line.get_marker() == METHOD_STYLES[container.get_label()]["marker"]


def test_summary_plot_is_written_as_png_and_svg(tmp_path):
    png, svg = tmp_path / "id_vs_ood.png", tmp_path / "id_vs_ood.svg"
    plot_id_vs_ood(DEFAULT_SUMMARY, out_path=png, svg_path=svg)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = svg.read_text()
    assert "<svg" in text and "lpft" in text and "wiseft" in text
    first = svg.read_bytes()
    plot_id_vs_ood(DEFAULT_SUMMARY, out_path=png, svg_path=svg)
    assert svg.read_bytes() == first  # same table, same file


def test_a_failed_row_is_left_out_of_the_plot():
    missing = "wiseft"  # e.g. every run of its endpoint diverged: a row of NaN
    table = DEFAULT_SUMMARY.copy()
    table.loc[table["method"] == missing, ["id", "ood"]] = np.nan
    boxes = label_boxes(id_vs_ood_figure(table))
    assert missing not in [text for text, _ in boxes] and overlapping(boxes) == []
