"""Plotly figures for the pages (no Streamlit here). Lines are thinned to CHART_MAX_POINTS before drawing.

Every figure sets `uirevision`, so a redraw with new points keeps the user's zoom and hidden traces.
"""
from __future__ import annotations

import base64
from typing import Any

import numpy as np
import plotly.graph_objects as go

from app.defaults import CHART_MAX_POINTS
from app.tables import LiveSeries, thin
from worker.api import JobState, TrialCount

HEIGHT = 260
_TEMPLATE = go.Figure().to_dict()["layout"].get("template", {})
"""The default template a plotly Figure carries (Streamlit's theme replaces it in the browser)."""
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")


def _layout(fig: go.Figure, title: str, y_title: str, *, revision: str, y_range: list[float] | None = None) -> None:
    fig.update_layout(
        title={"text": title, "font": {"size": 14}}, height=HEIGHT, margin={"l": 10, "r": 10, "t": 40, "b": 10},
        uirevision=revision, hovermode="x unified",
        legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02, "yanchor": "bottom", "font": {"size": 11}},
    )
    fig.update_xaxes(title_text="epoch", title_standoff=4)
    fig.update_yaxes(title_text=y_title, range=y_range)
    if not fig.data:
        fig.add_annotation(text="waiting for the first points", showarrow=False, xref="paper", yref="paper", x=0.5,
                           y=0.5, font={"color": "gray"})
        fig.update_xaxes(range=[0, 1], showticklabels=False)
        fig.update_yaxes(showticklabels=False)


def _line(x: Any, y: Any, name: str, color: str, *, dash: str | None = None, markers: bool = False,
          width: float = 2.0, opacity: float = 1.0) -> go.Scatter:
    markers = markers or len(x) < 20  # a line of a few points is easier to read with its points marked
    return go.Scatter(x=x, y=y, name=name, mode="lines+markers" if markers else "lines", marker={"size": 5},
                      line={"color": color, "dash": dash, "width": width}, opacity=opacity)


def _step_trace(s: LiveSeries, values: list[float], max_points: int, name: str, color: str,
                **style: Any) -> list[dict[str, Any]]:
    """The per-step curve of `values`, thinned to max_points, as a one-trace list; [] when no step event arrived."""
    if not s.step_x:
        return []
    x, y = thin(s.step_x, values, max_points)
    return [_line_spec(x, y, name, color, **style)]


def live_figures(s: LiveSeries, revision: str, max_points: int = CHART_MAX_POINTS) -> dict[str, go.Figure]:
    """The four live charts of a job: loss, accuracy, learning rate, images/s.

    Built as finished specs (plain dicts, numpy arrays for the points) wrapped in `SpecFigure`: plotly's validating
    constructors and `update_layout` took ~75 ms a chart here, on every refresh of every viewer, for figures whose
    every key is a constant of this function (docs/benchmarks.md, "Live viewers").
    """
    ep = np.asarray(s.epoch, dtype=float)
    figs: dict[str, go.Figure] = {}

    loss = _step_trace(s, s.step_loss, max_points, "train loss (steps)", COLORS[0], width=1.0, opacity=0.45)
    if len(ep):
        loss.append(_line_spec(ep, _arr(s.train_loss), "train loss", COLORS[0], markers=True))
        loss.append(_line_spec(ep, _arr(s.val_loss), "val loss", COLORS[1], markers=True))
    figs["loss"] = SpecFigure(_figure_spec(loss, "Loss", "loss", revision=revision))

    acc = []
    if len(ep):
        acc.append(_line_spec(ep, _arr(s.train_acc), "train accuracy", COLORS[0], markers=True))
        acc.append(_line_spec(ep, _arr(s.val_acc), "val accuracy", COLORS[1], markers=True))
    figs["accuracy"] = SpecFigure(_figure_spec(acc, "Accuracy", "accuracy", revision=revision,
                                               y_range=[0, 1.02] if len(ep) else None))

    lr = _step_trace(s, s.step_lr, max_points, "learning rate", COLORS[2])
    if not lr and len(ep):
        lr.append(_line_spec(ep, _arr(s.epoch_lr), "learning rate", COLORS[2], markers=True))
    figs["lr"] = SpecFigure(_figure_spec(lr, "Learning rate", "lr", revision=revision))

    ips = _step_trace(s, s.step_ips, max_points, "images/s (steps)", COLORS[4], width=1.0, opacity=0.6)
    if len(ep):
        ips.append(_line_spec(ep, _arr(s.epoch_ips), "images/s (epoch)", COLORS[4], markers=True))
    figs["throughput"] = SpecFigure(_figure_spec(ips, "Throughput", "images/s", revision=revision))
    return figs


class SpecFigure(go.Figure):
    """A Figure that hands over a spec built here instead of holding plotly objects.

    `st.plotly_chart` calls `to_dict()` (a deep copy of every point) and then serialises the result; this returns
    the spec itself. The spec is read, never changed, so several sessions may share one. Only for specs this module
    builds from its own constants: nothing is validated.
    """

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self._spec = spec

    def to_dict(self) -> dict[str, Any]:
        return self._spec

    @property
    def spec(self) -> dict[str, Any]:
        return self._spec


def _line_spec(x: Any, y: Any, name: str, color: str, *, dash: str | None = None, markers: bool = False,
               width: float = 2.0, opacity: float = 1.0) -> dict[str, Any]:
    """A scatter trace as `_line` draws it, as a spec (x, y as typed arrays, as plotly sends numpy arrays)."""
    markers = markers or len(x) < 20
    trace: dict[str, Any] = {"type": "scatter", "x": _typed_array(x), "y": _typed_array(y),
                             "name": name, "mode": "lines+markers" if markers else "lines", "marker": {"size": 5},
                             "line": {"color": color, "width": width}, "opacity": opacity}
    if dash:
        trace["line"]["dash"] = dash
    return trace


def _typed_array(values: Any) -> dict[str, str]:
    """A float array as plotly.js's typed-array spec (base64 of little-endian float64; NaN is a gap), what plotly
    itself sends for numpy arrays: a third of the JSON text of a list of floats, and no float formatting."""
    arr = np.ascontiguousarray(values, dtype="<f8")
    return {"dtype": "f8", "bdata": base64.b64encode(arr.tobytes()).decode("ascii")}


def _figure_spec(traces: list[dict[str, Any]], title: str, y_title: str, *, revision: str,
                 y_range: list[float] | None = None) -> dict[str, Any]:
    """`_layout`'s layout as a spec."""
    layout: dict[str, Any] = {
        "title": {"text": title, "font": {"size": 14}}, "height": HEIGHT,
        "margin": {"l": 10, "r": 10, "t": 40, "b": 10}, "uirevision": revision, "hovermode": "x unified",
        "legend": {"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02, "yanchor": "bottom",
                   "font": {"size": 11}},
        "xaxis": {"title": {"text": "epoch", "standoff": 4}},
        "yaxis": {"title": {"text": y_title}, **({"range": y_range} if y_range else {})},
        "template": _TEMPLATE,
    }
    if not traces:
        layout["annotations"] = [{"text": "waiting for the first points", "showarrow": False, "xref": "paper",
                                  "yref": "paper", "x": 0.5, "y": 0.5, "font": {"color": "gray"}}]
        layout["xaxis"].update(range=[0, 1], showticklabels=False)
        layout["yaxis"].update(showticklabels=False)
    return {"data": traces, "layout": layout}


def _arr(values: list[float | None]) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=float)


def confusion_figure(matrix: list[list[int]], classes: list[str]) -> go.Figure:
    """Counts, true label down, predicted across; colour by the share of the true class (rows sum to 1)."""
    z = np.asarray(matrix, dtype=float)
    share = z / np.maximum(z.sum(axis=1, keepdims=True), 1)
    labels = [str(c) for c in classes]
    fig = go.Figure(go.Heatmap(
        z=share, x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1, customdata=z.astype(int),
        text=z.astype(int) if len(labels) <= 30 else None, texttemplate="%{text}" if len(labels) <= 30 else None,
        hovertemplate="true %{y} → predicted %{x}: %{customdata} (%{z:.0%} of the class)<extra></extra>",
        colorbar={"title": "share"},
    ))
    side = min(900, max(320, 36 * len(labels) + 120))
    fig.update_layout(height=side, margin={"l": 10, "r": 10, "t": 30, "b": 10}, title="Confusion matrix (test)")
    fig.update_xaxes(title_text="predicted", type="category")
    fig.update_yaxes(title_text="true", type="category", autorange="reversed")
    return fig


def compare_figures(runs: dict[str, list[dict[str, Any]]]) -> dict[str, go.Figure]:
    """Overlay per-epoch curves of several runs: loss and accuracy (val solid, train dotted)."""
    figs = {"loss": go.Figure(), "accuracy": go.Figure()}
    for i, (label, epochs) in enumerate(runs.items()):
        color = COLORS[i % len(COLORS)]
        x = [e.get("epoch") for e in epochs]
        for metric, fig in (("loss", figs["loss"]), ("acc", figs["accuracy"])):
            fig.add_trace(_line(x, [e.get(f"val_{metric}") for e in epochs], f"{label} val", color, markers=True))
            fig.add_trace(_line(x, [e.get(f"train_{metric}") for e in epochs], f"{label} train", color, dash="dot"))
    _layout(figs["loss"], "Loss per epoch", "loss", revision="compare")
    _layout(figs["accuracy"], "Accuracy per epoch", "accuracy", revision="compare")
    for fig in figs.values():
        fig.update_layout(height=360, margin={"l": 10, "r": 10, "t": 70, "b": 10},
                          legend={"orientation": "h", "x": 0, "xanchor": "left", "y": 1.02, "yanchor": "bottom"})
    return figs


def counts_figure(counts: dict[str, int]) -> go.Figure:
    """Images per class (dataset health)."""
    fig = go.Figure(go.Bar(x=list(counts), y=list(counts.values()), marker_color=COLORS[0]))
    fig.update_layout(height=240, margin={"l": 10, "r": 10, "t": 30, "b": 10}, title="Images per class")
    fig.update_xaxes(type="category")
    return fig


def objective_figure(trials: list[dict[str, Any]], metric: str, direction: str) -> go.Figure:
    """The objective of each trial (complete ones, and pruned ones at the value they were stopped with) and the
    best so far."""
    fig = go.Figure()
    for state, color, symbol in ((JobState.FINISHED, COLORS[0], "circle"), (JobState.PRUNED, COLORS[4], "x")):
        pts = [t for t in trials if t.get("state") == state and t.get("value") is not None]
        fig.add_trace(go.Scatter(x=[t["number"] for t in pts], y=[t["value"] for t in pts], mode="markers",
                                 name=str(TrialCount.of(state)),
                                 marker={"color": color, "symbol": symbol, "size": 9}))
    best, xs, ys = None, [], []
    for t in sorted(trials, key=lambda t: t["number"]):
        if t.get("state") == JobState.FINISHED and t.get("value") is not None:
            better = best is None or (t["value"] > best if direction == "maximize" else t["value"] < best)
            best = t["value"] if better else best
        if best is not None:
            xs.append(t["number"])
            ys.append(best)
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="best so far", line={"color": COLORS[2], "shape": "hv"}))
    _layout(fig, f"{metric} per trial", metric, revision="sweep:objective")
    fig.update_xaxes(title_text="trial", tick0=0, dtick=max(1, len(trials) // 10))
    fig.update_layout(hovermode="closest")
    return fig


def importances_figure(importances: dict[str, float]) -> go.Figure:
    """Optuna's parameter importances as horizontal bars, most important on top."""
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig = go.Figure(go.Bar(x=[v for _, v in items], y=[k for k, _ in items], orientation="h",
                           marker_color=COLORS[0]))
    fig.update_layout(title={"text": "Parameter importances (Optuna)", "font": {"size": 14}}, height=HEIGHT,
                      margin={"l": 10, "r": 10, "t": 40, "b": 10})
    fig.update_xaxes(title_text="importance", range=[0, 1])
    return fig
