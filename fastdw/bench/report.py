"""Results of a benchmark run: rows of medians per engine, written as Markdown, JSON and a PNG plot.

Every row holds, per engine, either a median time in milliseconds or a status saying why there is
no time ("skipped: ...", "mismatch: ...", or "n/a" where the engine does not apply). Tables show
each time with its speed-up over eager PyTorch in NCHW (the ``eager`` column) in brackets, and a
last column comparing the fastest fastdw engine with the fastest other engine of the row.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from fastdw.bench.timing import markdown_table

BASELINE = "eager"

# engine -> column title, in table order
LABELS = {
    "eager": "eager NCHW",
    "eager_cl": "eager CL",
    "folded": "BN folded NCHW",
    "folded_cl": "BN folded CL",
    "compile": "torch.compile",
    "onnxruntime": "ONNX Runtime",
    "openvino": "OpenVINO",
    "fastdw": "fastdw NCHW",
    "fastdw_cl": "fastdw CL",
    "convert_cl": "fastdw.convert CL",
}
FASTDW_ENGINES = ("fastdw", "fastdw_cl", "convert_cl")

SECTIONS = {
    "ops_eval": "Ops, inference (eval, forward), ms",
    "ops_train": "Ops, training (forward + backward, batch statistics), ms",
    "models_eval": "Models, inference (eval, torch.no_grad), ms",
    "models_train": "Models, one training step (forward, cross-entropy, backward, SGD step), ms",
}


@dataclass
class Row:
    """One line of a table: what was measured (``key``) and, per engine, a time or a status."""

    section: str
    key: dict[str, object]
    ms: dict[str, float] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)  # more table columns after the times
    extra: dict[str, object] = field(default_factory=dict)  # JSON only

    def spread(self) -> dict[str, float]:
        """Where ``timing.interleaved`` puts each engine's interquartile range / median (JSON)."""
        return self.extra.setdefault("relative_iqr", {})

    def speedup(self, engine: str) -> float | None:
        """Eager NCHW time / this engine's time (None if either is missing)."""
        if engine not in self.ms or BASELINE not in self.ms:
            return None
        return self.ms[BASELINE] / self.ms[engine]

    def best_vs_best(self) -> float | None:
        """Fastest non-fastdw time / fastest fastdw time: > 1 means fastdw wins the row."""
        ours = [t for e, t in self.ms.items() if e in FASTDW_ENGINES]
        theirs = [t for e, t in self.ms.items() if e not in FASTDW_ENGINES]
        if not ours or not theirs:
            return None
        return min(theirs) / min(ours)


def _fmt_ms(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


NOISY = 0.5  # relative interquartile range above which a time is marked as noisy


def cell(row: Row, engine: str) -> str:
    if engine in row.ms:
        s = row.speedup(engine)
        noisy = " †" if row.extra.get("relative_iqr", {}).get(engine, 0.0) > NOISY else ""
        return _fmt_ms(row.ms[engine]) + noisy + ("" if s is None or engine == BASELINE else f" ({s:.2f}x)")
    status = row.status.get(engine, "n/a")
    return "—" if status == "n/a" else status.split(":", 1)[0]


def _key_text(key: dict[str, object]) -> list[str]:
    return [str(v) for v in key.values()]


def section_table(rows: list[Row]) -> str:
    """A Markdown table of rows of one section; engine columns that no row has are left out."""
    engines = [e for e in LABELS if any(e in r.ms or r.status.get(e, "n/a") != "n/a" for r in rows)]
    extra_cols = list(dict.fromkeys(k for r in rows for k in r.columns))
    header = list(rows[0].key) + [LABELS[e] for e in engines] + ["fastdw vs best other"] + extra_cols
    body = []
    for r in rows:
        bb = r.best_vs_best()
        body.append(_key_text(r.key) + [cell(r, e) for e in engines] + ["—" if bb is None else f"{bb:.2f}x"]
                    + [r.columns.get(k, "") for k in extra_cols])
    return markdown_table(header, body)


def notes(rows: list[Row]) -> list[str]:
    """One line per distinct reason an engine has no time (skipped / mismatch), with its rows."""
    seen: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        for e, s in r.status.items():
            if s != "n/a":
                seen.setdefault((LABELS.get(e, e), s), []).append(" ".join(_key_text(r.key)))
    out = []
    for (label, s), where in seen.items():
        scope = "all rows" if len(where) == len(rows) else ", ".join(where[:4]) + (" ..." if len(where) > 4
                                                                                  else "")
        out.append(f"- {label}: {s} ({scope})")
    return out


def markdown(rows: list[Row], command: str, header: str) -> str:
    parts = [f"`{command}`", "", header, ""]
    for section, title in SECTIONS.items():
        sec = [r for r in rows if r.section == section]
        if not sec:
            continue
        parts += [f"### {title}", "", section_table(sec), ""]
        n = notes(sec)
        if any(v > NOISY for r in sec for v in r.extra.get("relative_iqr", {}).values()):
            n.append(f"- †: noisy, the interquartile range of the repetitions is above {NOISY:.0%} of the "
                     f"median (a busy machine)")
        if n:
            parts += n + [""]
    return "\n".join(parts).rstrip() + "\n"


def write(rows: list[Row], out_dir: str, stem: str, command: str, header: str, meta: dict) -> dict[str, str]:
    """Write ``stem``.md, .json and .png into ``out_dir``; returns the paths by kind."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {kind: os.path.join(out_dir, f"{stem}.{kind}") for kind in ("md", "json", "png")}
    with open(paths["md"], "w") as f:
        f.write(markdown(rows, command, header))
    with open(paths["json"], "w") as f:
        json.dump({"command": command, **meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    try:
        plot(rows, paths["png"], command)
    except ImportError:  # matplotlib is not installed: the tables and the JSON still count
        print("matplotlib is not installed: no plot")
        del paths["png"]
    return paths


def plot(rows: list[Row], path: str, title: str) -> None:
    """Horizontal bars: speed-up over eager NCHW of every timed engine, one group per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [s for s in SECTIONS if any(r.section == s for r in rows)]
    heights = [max(1.5, 0.28 * sum(1 for r in rows if r.section == s) * 3 + 1.0) for s in sections]
    fig, axes = plt.subplots(len(sections) or 1, 1, figsize=(11, sum(heights) or 2),
                             gridspec_kw={"height_ratios": heights} if sections else None, squeeze=False)
    colours = dict(zip(LABELS, plt.get_cmap("tab10").colors, strict=False))
    for ax, section in zip(axes[:, 0], sections, strict=False):
        sec = [r for r in rows if r.section == section]
        engines = [e for e in LABELS if e != BASELINE and any(r.speedup(e) is not None for r in sec)]
        width = 0.8 / max(1, len(engines))
        for j, e in enumerate(engines):
            ys = [i + (j - (len(engines) - 1) / 2) * width for i in range(len(sec))]
            vals = [r.speedup(e) or 0.0 for r in sec]
            ax.barh(ys, vals, height=width, color=colours[e], label=LABELS[e],
                    hatch="//" if e in FASTDW_ENGINES else None, edgecolor="white", linewidth=0.3)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(sec)))
        ax.set_yticklabels([" ".join(_key_text(r.key)) for r in sec], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("speed-up over eager PyTorch NCHW (x, higher is better)")
        ax.set_title(SECTIONS[section].rsplit(", ms", 1)[0], fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
