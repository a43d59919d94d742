"""`rstpm test`'s ``report.html``: one self-contained page per evaluated variant.

The page holds the metrics table (overall and per defect type), the image ROC curves, the PRO
curves up to FPR 0.3 (as MVTec's AUPRO), the histogram of the image scores of good and
defective images with the image threshold, and a gallery of the best and worst cases drawn with
:mod:`rstpm.overlay`. Everything is inline: CSS in a ``<style>`` element, images as
``data:image/png;base64`` URIs, no script and no external resource, so the file can be mailed or
archived alone. Plots are drawn with matplotlib's Agg canvas (imported only when a report is
written).

Curves:

* **Image ROC**: exact, one point per distinct image score (ties together), from the maxima of
  the maps, as :func:`rstpm.metrics.auroc`.
* **PRO**: points of the exact curve of :func:`rstpm.metrics.pro_curve`, sampled at a few
  hundred thresholds (normal-pixel quantiles at FPR steps of 0.001): every plotted point is a
  point of the full curve, while memory stays one image at a time (the full curve keeps one
  point per distinct pixel score, tens of millions at MVTec resolution). The areas in the
  legends are those of the metrics table, not of the sampled curve.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rstpm._version import __version__
from rstpm.core.fusion import resize_map
from rstpm.core.roi import resize_roi
from rstpm.data.images import load_image
from rstpm.data.layout import Sample
from rstpm.inference.overlay import colorize, encode_png, region_contour, render_overlay
from rstpm.metrics.curves import NORMAL_PIXEL_SAMPLE, image_roc_curve, pro_curves
from rstpm.metrics.thresholds import Thresholds
from rstpm.metrics.verdicts import Verdicts, count_verdicts
from rstpm.runs.files import atomic_write_bytes

__all__ = [
    "GALLERY_PER_GROUP",
    "load_rgb",
    "render_report",
    "select_cases",
    "write_report",
]

GALLERY_PER_GROUP = 4
"""Images per gallery group (e.g. "defective images with the lowest scores")."""

PRO_FPR_LIMIT = 0.3
_GROUND_TRUTH_COLOUR = (57, 255, 20)  # green: outer contour of the ground-truth mask
_CONTOUR_WIDTH = 2  # gallery contours, in pixels of the gallery image
_DPI = 100


def load_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB at its own size, with :func:`rstpm.data.load_image`'s
    conversions (grayscale, palette, RGBA, CMYK, 16-bit...)."""
    tensor = load_image(Path(path))
    array = tensor.mul(255.0).round_().clamp_(0, 255).byte().permute(1, 2, 0).numpy()
    return np.ascontiguousarray(array)


def _gallery_size(height: int, width: int, longest: int) -> tuple[int, int]:
    scale = longest / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def select_cases(
    scores: Sequence[float], labels: Sequence[int], per_group: int = GALLERY_PER_GROUP
) -> dict[str, list[int]]:
    """Indices of the gallery's cases, by group:

    * ``worst_defective``: defective images with the lowest scores (lowest first);
    * ``worst_good``: good images with the highest scores (highest first);
    * ``best_defective``: defective images with the highest scores (highest first);
    * ``best_good``: good images with the lowest scores (lowest first).

    A worst and a best group of the same class never share an image: with fewer than
    ``2 * per_group`` images of a class, each gets half (the worst group the odd one).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    groups: dict[str, list[int]] = {}
    for cls, bad in (("defective", True), ("good", False)):
        members = np.flatnonzero(labels == bad)
        # ascending "how well it is handled": defective by score, good by minus score
        key = scores[members] if bad else -scores[members]
        ranked = members[np.argsort(key, kind="stable")].tolist()
        n_worst = min(per_group, math.ceil(len(ranked) / 2))
        n_best = min(per_group, len(ranked) - n_worst)
        groups[f"worst_{cls}"] = ranked[:n_worst]
        groups[f"best_{cls}"] = ranked[::-1][:n_best]
    return {k: groups[k] for k in ("worst_defective", "worst_good", "best_defective", "best_good")}


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg canvas)
# --------------------------------------------------------------------------------------------


def _new_figure(width: float = 4.4, height: float = 3.5) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _figure_png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return buffer.getvalue()


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _plot_roc(scores: np.ndarray, labels: np.ndarray, types: list[str], result: dict) -> bytes:
    figure = _new_figure()
    ax = figure.add_subplot()
    fpr, tpr = image_roc_curve(scores, labels)
    auc = result["overall"].get("image_auroc")
    ax.step(fpr, tpr, where="post", color="black", lw=2, label=f"overall ({_fmt(auc)})")
    good = np.array([t == "good" for t in types])
    for name, metrics in result["per_defect_type"].items():
        subset = good | np.array([t == name for t in types])
        if metrics.get("image_auroc") is None or subset.sum() == good.sum():
            continue
        fpr, tpr = image_roc_curve(scores[subset], labels[subset])
        label = f"{name} ({_fmt(metrics['image_auroc'])})"
        ax.step(fpr, tpr, where="post", lw=1.2, alpha=0.85, label=label)
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls=":")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="false positive rate (good images)")
    ax.set_ylabel("true positive rate (defective images)")
    ax.set_title("Image ROC (image AUROC)", fontsize=11)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _figure_png(figure)


def _plot_pro(curves: dict[str, tuple[np.ndarray, np.ndarray]], result: dict) -> bytes:
    figure = _new_figure()
    ax = figure.add_subplot()
    for name, (fpr, pro) in curves.items():
        metrics = result["overall"] if name == "overall" else result["per_defect_type"][name]
        label = f"{name} ({_fmt(metrics.get('pro'))})"
        keep = fpr <= PRO_FPR_LIMIT + 0.02
        if name == "overall":
            ax.plot(fpr[keep], pro[keep], color="black", lw=2, label=label)
        else:
            ax.plot(fpr[keep], pro[keep], lw=1.2, alpha=0.85, label=label)
    ax.set(xlim=(0, PRO_FPR_LIMIT), ylim=(-0.01, 1.02), xlabel="false positive rate (pixels)")
    ax.set_ylabel("per-region overlap")
    ax.set_title(f"PRO curve to FPR {PRO_FPR_LIMIT} (AUPRO)", fontsize=11)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _figure_png(figure)


def _plot_histogram(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> bytes:
    figure = _new_figure()
    ax = figure.add_subplot()
    low, high = float(scores.min()), float(scores.max())
    if threshold is not None:
        low, high = min(low, threshold), max(high, threshold)
    if high <= low:
        high = low + 1.0
    n_bins = int(np.clip(len(scores) // 3, 10, 40))
    bins = np.linspace(low, high, n_bins + 1)
    for bad, colour, name in ((False, "tab:blue", "good"), (True, "tab:red", "defective")):
        values = scores[labels == bad]
        if values.size:
            ax.hist(
                values,
                bins=bins,
                color=colour,
                alpha=0.55,
                label=f"{name} ({values.size})",
                edgecolor=colour,
            )
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", lw=1.5, label=f"threshold {threshold:.4g}")
    ax.set(xlabel="image score (max of the anomaly map)", ylabel="images")
    ax.set_title("Image scores", fontsize=11)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _figure_png(figure)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_STYLE = """
* { box-sizing: border-box; }
body { margin: 0; background: #f4f5f7; color: #1d2330;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 20px 24px 40px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 10px; border-bottom: 2px solid #d5d9e0; padding-bottom: 4px; }
h3 { font-size: 14px; margin: 16px 0 8px; color: #3a4254; }
.sub { color: #5b6475; margin: 0 0 14px; }
.card { background: #fff; border: 1px solid #dde1e7; border-radius: 6px; padding: 12px 14px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 14px; margin: 0; }
dl.facts dt { color: #5b6475; }
dl.facts dd { margin: 0; word-break: break-all; }
table.metrics { border-collapse: collapse; background: #fff; min-width: 60%; }
table.metrics th, table.metrics td { border: 1px solid #dde1e7; padding: 5px 12px; }
table.metrics th { background: #eef0f4; text-align: center; font-weight: 600; }
table.metrics td { text-align: right; font-variant-numeric: tabular-nums; }
table.metrics td.name { text-align: left; font-weight: 600; }
table.metrics tr.overall td { background: #f7f8fb; border-bottom: 2px solid #b9c0cc; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr)); gap: 14px; }
.plots figure { margin: 0; }
.plots img { width: 100%; height: auto; display: block; }
.note { color: #5b6475; font-size: 13px; }
.legend { display: flex; flex-wrap: wrap; align-items: center; gap: 8px 18px; margin: 6px 0; }
.legend img { width: 220px; height: 12px; border: 1px solid #999; vertical-align: middle; }
.swatch { display: inline-block; width: 14px; height: 14px; vertical-align: middle;
  border: 1px solid #555; margin-right: 4px; }
.gallery { display: grid; grid-template-columns: repeat(4, minmax(0, 1fr)); gap: 12px; }
.gallery figure { margin: 0; background: #fff; border: 1px solid #dde1e7; border-radius: 6px;
  padding: 6px; }
.gallery img { width: 100%; height: auto; display: block; image-rendering: auto; }
.gallery figcaption { font-size: 12.5px; margin-top: 5px; line-height: 1.35; }
.gallery .file { font-weight: 600; word-break: break-all; }
.ok { color: #137333; font-weight: 600; }
.bad { color: #b3261e; font-weight: 600; }
.empty { color: #5b6475; font-style: italic; }
footer { margin-top: 30px; color: #8a93a3; font-size: 12px; }
"""

_GROUP_TITLES = {
    "worst_defective": "Defective images with the lowest scores (the hardest to catch)",
    "worst_good": "Good images with the highest scores (the closest to false alarms)",
    "best_defective": "Defective images with the highest scores",
    "best_good": "Good images with the lowest scores",
}


def _metrics_table(result: dict, verdicts: dict[str, Verdicts] | None) -> str:
    head = ["set", "image AUROC", "pixel AUROC", "PRO", "images", "good", "defective"]
    if verdicts is not None:
        head += ["detected", "false alarms"]
    rows = [("overall", result["overall"]), *result["per_defect_type"].items()]
    out = ["<table class='metrics'><thead><tr>"]
    out += [f"<th>{html.escape(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for name, m in rows:
        css = " class='overall'" if name == "overall" else ""
        cells = [
            f"<td class='name'>{html.escape(name)}</td>",
            f"<td>{_fmt(m.get('image_auroc'))}</td>",
            f"<td>{_fmt(m.get('pixel_auroc'))}</td>",
            f"<td>{_fmt(m.get('pro'))}</td>",
            f"<td>{m.get('n_images', '')}</td>",
            f"<td>{m.get('n_good', '')}</td>",
            f"<td>{m.get('n_defective', '')}</td>",
        ]
        if verdicts is not None:
            v = verdicts[name]
            cells.append(f"<td>{v.detected} / {v.n_defective}</td>")
            cells.append(f"<td>{v.false_alarms} / {v.n_good}</td>")
        out.append(f"<tr{css}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _false_alarm_table(checks: list[dict]) -> str:
    """The calibration's promise checked on the test's good images, per target rate."""
    head = ["target false-alarm rate", "threshold", "false alarms", "realised (95 % interval)"]
    head += ["target inside", "detected"]
    out = ["<table class='metrics'><thead><tr>"]
    out += [f"<th>{html.escape(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for c in checks:
        low, high = c["interval_95"] or (None, None)
        realised = _fmt(c["false_alarm_rate"])
        interval = "" if low is None else f" ({low:.3f}&ndash;{high:.3f})"
        cells = [
            f"{c['target']:.3g}",
            f"{c['threshold']:.6g}",
            f"{c['false_alarms']} / {c['n_good']}",
            realised + interval,
            {True: "yes", False: "no", None: "n/a"}[c["target_in_interval"]],
            f"{c['detected']} / {c['n_defective']}",
        ]
        out.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _facts(result: dict, thresholds: Thresholds | None) -> str:
    items: list[tuple[str, str]] = [
        ("variant", str(result.get("variant", ""))),
        ("run", str(result.get("run", ""))),
        ("data", str(result.get("data", ""))),
        (
            "test images",
            f"{result['overall']['n_images']} ({result['overall']['n_good']} good, "
            f"{result['overall']['n_defective']} defective)",
        ),
    ]
    roi = result.get("roi")
    if roi:
        items.append(
            (
                "region of interest",
                f"{roi['area_fraction']:.1%} of the image ({roi['source']}); greyed outside",
            )
        )
    backend = result.get("backend")
    if backend is not None:
        items.append(("backend", f"{backend}, {result.get('precision', 'fp32')}"))
    if result.get("inference_seconds") is not None:
        threads = result.get("torch_threads")
        extra = f" ({threads} torch threads)" if threads else ""
        items.append(("inference", f"{result['inference_seconds']:.2f} s{extra}"))
    if thresholds is not None:
        items.append(
            ("image threshold", f"{thresholds.image.value:.6g} ({thresholds.image.source})")
        )
        items.append(
            ("pixel threshold", f"{thresholds.pixel.value:.6g} ({thresholds.pixel.source})")
        )
    else:
        items.append(("thresholds", "none calibrated for this variant: no verdicts, no contours"))
    body = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items)
    return f"<div class='card'><dl class='facts'>{body}</dl></div>"


def _gallery_tile(
    sample: Sample,
    amap: np.ndarray,
    mask: np.ndarray | None,
    score: float,
    thresholds: Thresholds | None,
    vmin: float,
    vmax: float,
    longest: int,
    roi: np.ndarray | None = None,
) -> str:
    image = load_rgb(sample.path)
    size = _gallery_size(image.shape[0], image.shape[1], longest)
    if size != image.shape[:2]:
        image = np.asarray(
            Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR)
        )
    small = resize_map(amap, size, antialias=True)
    inside = None if roi is None else resize_roi(roi, size)
    if thresholds is not None:
        small = np.asarray(thresholds.pixel.normalise(small), dtype=np.float32)
        tile = render_overlay(image, small, 0.0, 1.0, 0.5, contour_width=_CONTOUR_WIDTH, roi=inside)
    else:
        tile = render_overlay(image, small, vmin, vmax, None, roi=inside)
    if mask is not None and np.any(mask):
        truth = resize_map(np.asarray(mask, dtype=np.float32), size, antialias=True) >= 0.5
        tile[region_contour(truth, _CONTOUR_WIDTH, outside=True)] = _GROUND_TRUTH_COLOUR
    defective = sample.defect_type != "good"
    lines = [
        f"<span class='file'>{html.escape(sample.defect_type)} / "
        f"{html.escape(sample.path.name)}</span>",
    ]
    if thresholds is not None:
        normalised = float(thresholds.image.normalise(score))
        lines.append(f"score {score:.4g} (normalised {normalised:.2f})")
        anomalous = score >= thresholds.image.value
        verdict = "anomalous" if anomalous else "normal"
        if anomalous == defective:
            outcome = "<span class='ok'>correct</span>"
        else:
            outcome = "<span class='bad'>" + ("false alarm" if anomalous else "missed") + "</span>"
        lines.append(f"verdict: {verdict} &middot; {outcome}")
    else:
        lines.append(f"score {score:.4g}")
    alt = html.escape(f"{sample.defect_type}/{sample.path.name}", quote=True)
    return (
        f"<figure><img src='{_data_uri(encode_png(tile, palette=True))}' alt='{alt}'>"
        f"<figcaption>{'<br>'.join(lines)}</figcaption></figure>"
    )


def _colour_legend(thresholds: Thresholds | None, vmin: float, vmax: float) -> str:
    bar = colorize(np.tile(np.linspace(0.0, 1.0, 220), (12, 1)), 0.0, 1.0)
    uri = _data_uri(encode_png(bar))
    if thresholds is not None:
        scale = (
            f"normalised anomaly map: 0 <img src='{uri}' alt='colour scale'> 1 "
            "(0.5 = pixel threshold)"
        )
        contour = (
            "<span><span class='swatch' style='background:rgb(0,255,255)'></span>region above "
            "the pixel threshold</span>"
        )
    else:
        scale = (
            f"raw anomaly map: {vmin:.3g} <img src='{uri}' alt='colour scale'> {vmax:.3g} "
            "(median of the good images' pixels to the highest score)"
        )
        contour = ""
    r, g, b = _GROUND_TRUTH_COLOUR
    truth = (
        f"<span><span class='swatch' style='background:rgb({r},{g},{b})'></span>ground-truth "
        "defect (outline)</span>"
    )
    return f"<div class='legend'><span>{scale}</span>{contour}{truth}</div>"


def render_report(
    result: dict,
    samples: Sequence[Sample],
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None],
    thresholds: Thresholds | None,
    scores: Sequence[float],
    image_size_for_gallery: int = 256,
    roi: np.ndarray | None = None,
) -> str:
    """The report's HTML (see :func:`write_report`)."""
    n = len(samples)
    if len(maps) != n or len(masks) != n or len(scores) != n:
        raise ValueError(
            f"got {n} samples, {len(maps)} maps, {len(masks)} masks and {len(scores)} scores"
        )
    if n == 0:
        raise ValueError("no test images")
    types = [s.defect_type for s in samples]
    labels = np.array([t != "good" for t in types], dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    threshold = thresholds.image.value if thresholds is not None else None
    variant = html.escape(str(result.get("variant", "")))

    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>rstpm report: {variant}</title><style>{_STYLE}</style></head><body><main>",
        f"<h1>Anomaly detection report &mdash; variant <code>{variant}</code></h1>",
        "<p class='sub'>image score = max of the anomaly map at the network's input size; per "
        "defect type: the good images plus the images of that type (MVTec protocol); PRO "
        "integrated to FPR 0.3</p>",
        _facts(result, thresholds),
        "<h2>Metrics</h2>",
        _metrics_table(
            result,
            count_verdicts(scores, types, threshold) if threshold is not None else None,
        ),
    ]
    if threshold is not None:
        parts.append(
            "<p class='note'>detected: defective images with score &ge; the image threshold; "
            "false alarms: good images with score &ge; the image threshold.</p>"
        )
    if result.get("false_alarm_check"):
        n_cal = result["false_alarm_check"][0]["n_calibration"]
        parts += [
            "<h2>Does the calibration keep its promise?</h2>",
            _false_alarm_table(result["false_alarm_check"]),
            f"<p class='note'>thresholds at each target from the run's {n_cal} calibration "
            "images (held-out normals); the realised rate on this test set's good images with "
            "its exact (Clopper-Pearson) 95 % interval, which should contain the target</p>",
        ]

    # plots
    plots: list[tuple[str, bytes | None, str]] = []
    has_both = bool(labels.any() and (~labels).any())
    roc = _plot_roc(scores, labels, types, result) if has_both else None
    plots.append(("image ROC curve", roc, "needs good and defective images"))
    pro_subsets = {
        name: [i for i, t in enumerate(types) if t == "good" or name in ("overall", t)]
        for name, m in [("overall", result["overall"]), *result["per_defect_type"].items()]
        if m.get("pro") is not None
    }
    curves = pro_curves(maps, masks, pro_subsets) if pro_subsets else {}
    pro = _plot_pro(curves, result) if curves else None
    plots.append(("PRO curve", pro, "needs pixel ground truth of every defective image"))
    plots.append(("image score histogram", _plot_histogram(scores, labels, threshold), ""))
    parts.append("<h2>Curves and scores</h2><div class='plots'>")
    for title, png, missing in plots:
        if png is None:
            parts.append(
                f"<figure class='card'><p class='empty'>no {html.escape(title)}: "
                f"{html.escape(missing)}</p></figure>"
            )
        else:
            parts.append(
                f"<figure class='card'><img src='{_data_uri(png)}' "
                f"alt='{html.escape(title, quote=True)}'></figure>"
            )
    parts.append("</div>")

    # gallery
    good_maps = [m for m, bad in zip(maps, labels, strict=True) if not bad] or list(maps)
    stride = max(1, sum(int(np.size(m)) for m in good_maps) // NORMAL_PIXEL_SAMPLE)
    vmin = float(np.median(np.concatenate([np.ravel(m)[::stride] for m in good_maps])))
    vmax = float(scores.max())
    cases = select_cases(scores, labels)
    parts.append("<h2>Gallery</h2>")
    parts.append(_colour_legend(thresholds, vmin, vmax))
    for heading, groups in (
        ("Worst cases", ("worst_defective", "worst_good")),
        ("Best cases", ("best_defective", "best_good")),
    ):
        parts.append(f"<h2>{heading}</h2>")
        for group in groups:
            parts.append(f"<h3>{html.escape(_GROUP_TITLES[group])}</h3>")
            if not cases[group]:
                parts.append("<p class='empty'>no such image in the test set</p>")
                continue
            parts.append("<div class='gallery'>")
            for i in cases[group]:
                parts.append(
                    _gallery_tile(
                        samples[i],
                        maps[i],
                        masks[i],
                        float(scores[i]),
                        thresholds,
                        vmin,
                        vmax,
                        image_size_for_gallery,
                        roi,
                    )
                )
            parts.append("</div>")
    parts.append(
        f"<footer>written by rstpm {html.escape(__version__)} (<code>rstpm test</code>); "
        "self-contained: no script, no external resource.</footer></main></body></html>\n"
    )
    return "\n".join(parts)


def write_report(
    path: Path,
    result: dict,
    samples: list,
    maps: list[np.ndarray],
    masks: list[np.ndarray | None],
    thresholds: Thresholds | None,
    scores: Sequence[float],
    image_size_for_gallery: int = 256,
    roi: np.ndarray | None = None,
) -> None:
    """Write the self-contained HTML report of one evaluated variant, atomically.

    Args:
        path: the HTML file (``<out>/report.html`` for ``rstpm test``).
        result: the variant's result as written to metrics.json (``overall`` and
            ``per_defect_type`` from :func:`rstpm.metrics.evaluate`, plus ``variant``, ``run``,
            ``data``, ``backend``...).
        samples: the test :class:`~rstpm.data.Sample` objects, in the order of ``maps``.
        maps: each image's anomaly map at its own resolution.
        masks: each image's ground truth (bool, same shape) or None.
        thresholds: the variant's calibrated thresholds, or None: then the histogram has no
            threshold line, the gallery shows raw heatmaps without contours or verdicts.
        image_size_for_gallery: longest side of the gallery images in pixels (resized
            bilinearly, map included, before the contours are drawn: they stay 1 px thin).
        scores: each image's score (the max of its map at the network's size,
            rstpm.inference.maps).
        roi: the region of interest the maps were restricted to (bool, any size), or None: the
            gallery draws the outside greyed (render_overlay), the facts name its area.
    """
    page = render_report(
        result, samples, maps, masks, thresholds, scores, image_size_for_gallery, roi
    )
    atomic_write_bytes(Path(path), page.encode("utf-8"))
