"""End-of-run report: report.json, PNG plots and report.md in the run folder.

    table = write_report(run_dir, report, history, confusion, class_names)
    print(table)

Files (all written through coreg_dist.io, so readers never see half a file):
    run_dir/report.json           the `report` dict, pretty-printed (non-finite numbers -> null)
    run_dir/plots/accuracy.png    test accuracy per epoch + the annotator's zero-shot line
    run_dir/plots/partition.png   |P| / |U| per epoch; pseudo-label accuracy and candidate coverage;
                                  accuracy of U's unrestricted guesses inside / outside the candidates
    run_dir/plots/losses.png      every "loss", "loss/..." and "loss_..." history key per epoch
    run_dir/plots/confusion.png   row-normalised confusion matrix of the final predictions
    run_dir/report.md             title, table of key numbers, gain, plots, run details

A plot whose data is absent (pce has no |P|, no confusion matrix given, ...) is skipped and any
stale copy from an earlier run in the same folder is removed. A plot that fails to draw is
skipped with a warning: the report of a long run is never lost to a plotting problem.

Accuracies, eta and coverages are fractions in [0, 1] (as the annotator writes them); a value
above 1 is taken to be a percentage already.
"""
from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from coreg_dist.io import atomic_path, atomic_write_json, atomic_write_text
from train.metrics_log import to_jsonable

PLOTS_DIR = "plots"
ACC_KEYS = ("test_acc_net1", "test_acc_net2", "test_acc_ensemble", "test_acc")
PLOT_FILES = ("accuracy.png", "partition.png", "losses.png", "confusion.png")

# (key, label, kind) for the table; kind: pct | cand | int | seconds
TABLE_ROWS = (
    # The annotator is judged on the learner's test images; |S| and eta describe the training pool.
    ("annotator_zero_shot_acc", "Annotator zero-shot acc (test)", "pct"),
    ("annotator_template_avg_acc", "Annotator template-avg acc (test)", "pct"),
    ("avg_candidates", "Avg candidates per image (train pool)", "cand"),
    ("eta", "eta, true label not in S (train pool)", "pct"),
    ("test_acc_net1", "Test acc net1", "pct"),
    ("test_acc_net2", "Test acc net2", "pct"),
    ("test_acc_ensemble", "Test acc ensemble", "pct"),
    ("test_acc", "Test acc (the method's prediction)", "pct"),
    ("raw_test_acc", "Test acc without the output alignment (train.output_prior)", "pct"),
    ("epochs", "Epochs", "int"),
    ("seconds", "Time", "seconds"),
)

_NET_COLORS = {"net1": "tab:blue", "net2": "tab:orange", "ensemble": "tab:green", "": "tab:green"}
DPI = 120


# ---------------------------------------------------------------------------------------------
# numbers and formatting

def _num(v: Any) -> Optional[float]:
    """A finite float, or None for anything else (None, NaN, strings, bools)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        if hasattr(v, "item"):
            try:
                v = v.item()
            except Exception:
                return None
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                return None
        else:
            return None
    f = float(v)
    return f if math.isfinite(f) else None


def _as_pct(v: float) -> float:
    """Percent value of an accuracy given as a fraction (or, if > 1, already as percent)."""
    return v if v > 1.0 + 1e-9 else 100.0 * v


def format_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def _fmt(v: float, kind: str) -> str:
    if kind == "pct":
        return f"{_as_pct(v):.2f}%"
    if kind == "cand":
        return f"{v:.3f}"
    if kind == "int":
        return f"{int(round(v))}"
    if kind == "seconds":
        return format_seconds(v)
    return f"{v:g}"


def format_table(report: Dict[str, Any]) -> str:
    """Markdown table of the key numbers present in `report` (accuracies/eta as percents)."""
    lines = ["| Metric | Value |", "|---|---:|"]
    for key, label, kind in TABLE_ROWS:
        v = _num(report.get(key))
        if v is not None:
            lines.append(f"| {label} | {_fmt(v, kind)} |")
    return "\n".join(lines) + "\n"


def final_test_acc(report: Dict[str, Any]) -> Optional[tuple]:
    """(key, value) of the method's own prediction: `test_acc` (the ensemble where there is one),
    not the better of the two networks picked after the fact."""
    for k in ("test_acc", "test_acc_ensemble", "test_acc_net1"):
        v = _num(report.get(k))
        if v is not None:
            return k, v
    return None


def format_gain(report: Dict[str, Any], emphasis: str = "**") -> Optional[str]:
    """One sentence on the gain over zero-shot; `emphasis` wraps the number (markdown bold by default,
    "" for a terminal)."""
    final = final_test_acc(report)
    zs = _num(report.get("annotator_zero_shot_acc"))
    if final is None or zs is None:
        return None
    key, v = final
    gain = _as_pct(v) - _as_pct(zs)
    return (f"Gain of the test accuracy (`{key}`, {_as_pct(v):.2f}%) over the annotator's "
            f"zero-shot accuracy ({_as_pct(zs):.2f}%): {emphasis}{gain:+.2f} points{emphasis}.")


def _dataset_name(report: Dict[str, Any]) -> Optional[str]:
    for key in ("dataset", "data_source", "source"):
        d = report.get(key)
        if isinstance(d, dict):
            d = d.get("name") or d.get("source")
        if d:
            return str(d)
    return None


# ---------------------------------------------------------------------------------------------
# history helpers

def _flatten(rec: Dict[str, Any]) -> Dict[str, Any]:
    """One level of nesting -> "group/key" (so {"loss": {"ce": x}} also gives "loss/ce")."""
    out = {}
    for k, v in rec.items():
        if isinstance(v, dict):
            for sk, sv in v.items():
                out[f"{k}/{sk}"] = sv
        else:
            out[k] = v
    return out


def _prepare_history(history: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    by_epoch = {}
    for i, rec in enumerate(history or []):
        if not isinstance(rec, dict):
            continue
        ep = _num(rec.get("epoch"))
        by_epoch[int(ep) if ep is not None else i] = _flatten(rec)
    out = []
    for ep in sorted(by_epoch):
        rec = dict(by_epoch[ep])
        rec["epoch"] = ep
        out.append(rec)
    return out


def _series(hist: List[Dict[str, Any]], key: str):
    """(epochs, values) where the key holds a finite number; None if it never does."""
    xs, ys = [], []
    for rec in hist:
        v = _num(rec.get(key))
        if v is not None:
            xs.append(rec["epoch"])
            ys.append(v)
    return (np.asarray(xs), np.asarray(ys, dtype=float)) if xs else None


def _pct_series(s):
    xs, ys = s
    return xs, (ys if np.nanmax(ys) > 1.0 + 1e-9 else ys * 100.0)


def _net_of(key: str, base: str) -> str:
    return key[len(base):].lstrip("_")


def _variants(hist, base: str):
    """[(key, net)] for base_net1, base_net2, base_ensemble, or plain base, that have data."""
    out = []
    for key in (f"{base}_net1", f"{base}_net2", f"{base}_ensemble", base):
        if _series(hist, key) is not None:
            out.append((key, _net_of(key, base)))
    return out


# ---------------------------------------------------------------------------------------------
# plots (matplotlib's object API on an Agg canvas: no pyplot, no display, no global state)

def _new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def _epoch_axis(ax):
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(True, alpha=0.3)


def _title(report):
    parts = [str(report.get("method") or "run")]
    ds = _dataset_name(report)
    if ds:
        parts.append(ds)
    return " - ".join(parts)


def plot_accuracy(path, report, hist) -> bool:
    from matplotlib.ticker import PercentFormatter

    curves = [(k, _series(hist, k)) for k in ACC_KEYS]
    curves = [(k, s) for k, s in curves if s is not None]
    if not curves:
        return False
    fig = _new_figure((7.5, 4.5))
    ax = fig.add_subplot()
    ys_all = []
    for key, s in curves:
        xs, ys = _pct_series(s)
        ys_all.append(ys)
        net = _net_of(key, "test_acc")
        label = key.replace("test_acc_", "") if net else "test acc"
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, ms=3, lw=1.6,
                color=_NET_COLORS.get(net, None), label=f"{label} (last {ys[-1]:.2f}%)")
    # The method's prediction without the output alignment (train.output_prior), where it was on.
    raw = [(key, net) for key, net in _variants(hist, "raw_test_acc") if net in ("net1", "ensemble")]
    if raw:
        key, net = raw[-1]                       # the ensemble where there is one
        xs, ys = _pct_series(_series(hist, key))
        ys_all.append(ys)
        ax.plot(xs, ys, ls="--", lw=1.2, color="tab:gray", label=f"{net}, not aligned (last {ys[-1]:.2f}%)")
    zs = _num(report.get("annotator_zero_shot_acc"))
    if zs is not None:
        ax.axhline(_as_pct(zs), color="tab:red", ls="--", lw=1.2,
                   label=f"annotator zero-shot ({_as_pct(zs):.2f}%)")
        ys_all.append(np.asarray([_as_pct(zs)]))
    ta = _num(report.get("annotator_template_avg_acc"))
    if ta is not None:
        ax.axhline(_as_pct(ta), color="tab:purple", ls=":", lw=1.4,
                   label=f"annotator template-avg ({_as_pct(ta):.2f}%)")
        ys_all.append(np.asarray([_as_pct(ta)]))
    lo, hi = float(min(y.min() for y in ys_all)), float(max(y.max() for y in ys_all))
    pad = max(2.0, 0.08 * (hi - lo))
    ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad) if hi <= 100 else hi + pad)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))
    ax.set_ylabel("test accuracy")
    _epoch_axis(ax)
    ax.set_title(f"Test accuracy - {_title(report)}")
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    _save(fig, path)
    return True


def plot_partition(path, report, hist) -> bool:
    from matplotlib.ticker import PercentFormatter

    counts = [(k, net, "P", "-") for k, net in _variants(hist, "n_p")]
    counts += [(k, net, "U", "--") for k, net in _variants(hist, "n_u")]
    quality = [(k, net, "P label acc", "-", "o") for k, net in _variants(hist, "p_label_acc")]
    quality += [(k, net, "U label acc", "--", "o") for k, net in _variants(hist, "u_label_acc")]
    # [C] U's unrestricted guess inside / outside its candidate set, and how often it is right
    quality += [(k, net, "U in-cand acc", ":", "^") for k, net in _variants(hist, "u_in_cand_acc")]
    quality += [(k, net, "U out-cand acc", ":", "v") for k, net in _variants(hist, "u_out_cand_acc")]
    quality += [(k, net, "P coverage", "-", "s") for k, net in _variants(hist, "p_coverage")]
    quality += [(k, net, "U coverage", "--", "s") for k, net in _variants(hist, "u_coverage")]
    if not counts and not quality:
        return False
    panels = int(bool(counts)) + int(bool(quality))
    fig = _new_figure((7.5, 3.6 * panels))
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    i = 0
    if counts:
        ax = axes[i]
        i += 1
        for key, net, part, ls in counts:
            xs, ys = _series(hist, key)
            lab = f"|{part}| {net}" if net else f"|{part}|"
            ax.plot(xs, ys, ls=ls, lw=1.6, marker="o" if len(xs) <= 30 else None, ms=3,
                    color=_NET_COLORS.get(net), label=lab)
        ax.set_ylabel("samples")
        ax.set_title(f"Partition sizes (P: trusted, U: unlabeled) - {_title(report)}")
        ax.legend(loc="best", fontsize=8, framealpha=0.9, ncol=2)
        _epoch_axis(ax)
    if quality:
        ax = axes[i]
        markers_used = max(len(_series(hist, k)[0]) for k, *_ in quality) <= 30
        for key, net, what, ls, mk in quality:
            xs, ys = _pct_series(_series(hist, key))
            lab = f"{what} {net}" if net else what
            color = _NET_COLORS.get(net)
            ax.plot(xs, ys, ls=ls, lw=1.4, marker=mk if markers_used else None, ms=3,
                    color=color, alpha=1.0 if "acc" in what else 0.55, label=lab)
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))
        ax.set_ylabel("percent of partition")
        ax.set_title("Pseudo-label accuracy and candidate coverage")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
        _epoch_axis(ax)
    if counts and quality:
        axes[0].set_xlabel("")
    _save(fig, path)
    return True


def plot_losses(path, report, hist) -> bool:
    keys = sorted({k for rec in hist for k in rec if k == "loss" or k.startswith(("loss/", "loss_"))})
    curves = [(k, _series(hist, k)) for k in keys]
    curves = [(k, s) for k, s in curves if s is not None]
    if not curves:
        return False
    fig = _new_figure((7.5, 4.2))
    ax = fig.add_subplot()
    for key, (xs, ys) in curves:
        ax.plot(xs, ys, lw=1.5, marker="o" if len(xs) <= 30 else None, ms=3, label=key)
    pos = np.concatenate([s[1] for _, s in curves])
    if np.all(pos > 0) and pos.max() / pos.min() > 100:
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    _epoch_axis(ax)
    ax.set_title(f"Training losses - {_title(report)}")
    if len(curves) > 6:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    else:
        ax.legend(loc="best", fontsize=8, framealpha=0.9)
    _save(fig, path)
    return True


def plot_confusion(path, report, confusion, class_names) -> bool:
    if confusion is None:
        return False
    cm = np.asarray(confusion, dtype=float)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        warnings.warn(f"confusion matrix of shape {cm.shape} skipped (not square)")
        return False
    n = cm.shape[0]
    names = [str(c) for c in class_names] if class_names and len(class_names) == n \
        else [str(i) for i in range(n)]
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0) * 100.0
    total = cm.sum()
    acc = 100.0 * np.trace(cm) / total if total > 0 else float("nan")
    side = min(14.0, max(5.5, 0.62 * n + 2.5))
    fig = _new_figure((side + 0.9, side))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label("% of true class")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(names, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_yticklabels(names, fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 25:
        fs = 8 if n <= 12 else 6
        for i in range(n):
            for j in range(n):
                v = norm[i, j]
                if v < 0.5 and i != j:
                    continue                       # blank cells keep the matrix readable
                txt = f"{v:.0f}" if v >= 9.95 or v < 0.05 else f"{v:.1f}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=fs,
                        color="white" if v > 55 else "black")
    ax.set_title(f"Confusion (row %, final predictions) - {_title(report)}\n"
                 f"accuracy {acc:.2f}% over {int(total)} samples", fontsize=10)
    _save(fig, path)
    return True


# ---------------------------------------------------------------------------------------------
# the report

def _run_value(v: Any) -> str:
    if v is None or v == "":
        return "-"
    f = _num(v)
    if f is not None and not isinstance(v, str):
        return f"{f:,.1f}"
    return str(v)


def _markdown(report, table, plots: List[str]) -> str:
    out = [f"# {_title(report)}", ""]
    out += ["## Results", "", table.rstrip("\n"), ""]
    gain = format_gain(report)
    if gain:
        out += [gain, ""]
    if plots:
        out += ["## Plots", ""]
        for name in plots:
            stem = os.path.splitext(name)[0]
            out += [f"![{stem}]({PLOTS_DIR}/{name})", ""]
    out += ["## Run", "",
            f"- config file: {_run_value(report.get('config_file'))}",
            f"- device: {_run_value(report.get('device'))}",
            f"- samples/s: {_run_value(report.get('samples_per_s'))}",
            ""]
    return "\n".join(out)


def write_report(run_dir: str, report: Dict[str, Any], history: List[Dict[str, Any]],
                 confusion: Optional[np.ndarray], class_names: List[str]) -> str:
    """Write report.json, plots/*.png and report.md into run_dir; return the markdown table."""
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_json(os.path.join(run_dir, "report.json"), to_jsonable(report))
    hist = _prepare_history(history)
    plots_dir = os.path.join(run_dir, PLOTS_DIR)
    os.makedirs(plots_dir, exist_ok=True)
    jobs: Dict[str, Callable[[str], bool]] = {
        "accuracy.png": lambda p: plot_accuracy(p, report, hist),
        "partition.png": lambda p: plot_partition(p, report, hist),
        "losses.png": lambda p: plot_losses(p, report, hist),
        "confusion.png": lambda p: plot_confusion(p, report, confusion, class_names),
    }
    made = []
    for name, job in jobs.items():
        path = os.path.join(plots_dir, name)
        try:
            ok = job(path)
        except Exception as e:  # never lose a finished run's report to a plotting problem
            warnings.warn(f"plot {name} skipped: {type(e).__name__}: {e}", RuntimeWarning)
            ok = False
        if ok:
            made.append(name)
        elif os.path.exists(path):
            os.unlink(path)                      # stale plot from an earlier run in this folder
    table = format_table(report)
    atomic_write_text(os.path.join(run_dir, "report.md"), _markdown(report, table, made))
    return table
