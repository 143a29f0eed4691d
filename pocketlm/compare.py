"""`compare`: runs side by side — final and best metrics, the config keys and data that differ, loss curves.

Reads only what every run folder holds (metrics.jsonl, config.yaml, and the manifest.json of the dataset
the config names), so it works on finished, interrupted and still-running runs alike.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pocketlm.errors import PocketLMError

SKIP_CONFIG = {"train.out"}  # differs by construction
SKIP_MANIFEST = {"created", "seconds"}


def higher_is_better(metric: str) -> bool:
    return metric.endswith("acc")


def read_metrics(run: Path) -> list[dict[str, Any]]:
    file = run / "metrics.jsonl"
    if not run.is_dir():
        raise PocketLMError(f"no such run folder: {run}")
    if not file.is_file():
        raise PocketLMError(f"{run} has no metrics.jsonl: not a pocketlm run folder (train one with "
                            f"`pocketlm train DATA --out {run}`)")
    rows = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line of a run killed mid-write
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    if not rows:
        raise PocketLMError(f"{run}/metrics.jsonl holds no metrics yet: let the run log at least one step")
    return rows


def series(rows: list[dict[str, Any]], key: str) -> list[tuple[int, int, float]]:
    """(step, tokens seen, value) of a metric, in order."""
    out = []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append((r["step"], r.get("tokens", 0), float(v)))
    return out


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def run_config(run: Path) -> dict[str, Any]:
    import yaml

    file = run / "config.yaml"
    if not file.is_file():
        return {}
    try:
        return flatten(yaml.safe_load(file.read_text(encoding="utf-8")) or {})
    except yaml.YAMLError:
        raise PocketLMError(f"{file} is not valid YAML") from None


def manifest_of(cfg: dict[str, Any]) -> dict[str, Any] | None:
    path = cfg.get("data.path")
    if not path or not (Path(path) / "manifest.json").is_file():
        return None
    m = json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8"))
    inputs = m.pop("inputs", [])
    flat = {k: v for k, v in flatten(m).items() if k not in SKIP_MANIFEST}
    flat["inputs"] = ", ".join(f"{Path(i['path']).name} ({i['sha256'][:10]})" for i in inputs) or "-"
    flat["input_bytes"] = sum(i.get("bytes", 0) for i in inputs)
    return flat


def differing(tables: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for t in tables for k in t})
    return [k for k in keys if len({json.dumps(t.get(k), sort_keys=True, default=str) for t in tables}) > 1]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v).replace("|", "\\|").replace("\n", "\\n")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]]


def compare(runs: list[str | Path], metric: str = "val/loss", plot: str | Path | None = "compare.png") -> str:
    """The Markdown report; writes the loss-curve PNG to `plot` (None: no plot)."""
    if not runs:
        raise PocketLMError("give at least one run folder: pocketlm compare runs/a runs/b")
    paths = [Path(r) for r in runs]
    names = [str(p) for p in paths]
    rows = [read_metrics(p) for p in paths]
    better = max if higher_is_better(metric) else min
    if not any(series(r, metric) for r in rows):
        known = sorted({k for r in rows for row in r for k in row if k not in ("step", "tokens")})
        raise PocketLMError(f"no run logged {metric!r}; logged metrics: {', '.join(known)}")
    name = metric.split("/")[-1]
    extra = [m for m in ("train/loss", "val/loss", f"test/{name}") if m != metric]
    out = ["## Runs", ""]
    table = []
    for n, r in zip(names, rows):
        s = series(r, metric)
        best = better(s, key=lambda x: x[2]) if s else None
        last_step = max(row["step"] for row in r)
        tokens = max((row.get("tokens", 0) for row in r), default=0)
        finals = [series(r, m) for m in extra]
        table.append([n, last_step, tokens, f"{s[-1][2]:.4f}" if s else None,
                      f"{best[2]:.4f} (step {best[0]})" if best else None,
                      *[f"{f[-1][2]:.4f}" if f else None for f in finals]])
    out += _table(["run", "steps", "tokens", f"final {metric}", f"best {metric}", *[f"final {m}" for m in extra]],
                  table)
    configs = [run_config(p) for p in paths]
    keys = [k for k in differing(configs) if k not in SKIP_CONFIG]
    out += ["", "## Config keys that differ", ""]
    out += _table(["key", *names], [[k, *[c.get(k) for c in configs]] for k in keys]) if keys else ["(none)"]
    manifests = [manifest_of(c) for c in configs]
    out += ["", "## Data that differs", ""]
    if all(m is None for m in manifests):
        out.append("(no dataset manifest found for any run)")
    else:
        found = [m or {} for m in manifests]
        mkeys = differing(found)
        out += _table(["manifest key", *names], [[k, *[m.get(k) for m in found]] for k in mkeys]) if mkeys \
            else ["(the runs read the same data)"]
        missing = [n for n, m in zip(names, manifests) if m is None]
        if missing:
            out.append(f"\nno manifest found for: {', '.join(missing)} (its data.path has moved?)")
    if plot is not None:
        plot_curves(names, rows, metric, Path(plot))
        out += ["", f"![loss curves]({Path(plot)})"]
    return "\n".join(out) + "\n"


def plot_curves(names: list[str], rows: list[list[dict[str, Any]]], metric: str, file: Path) -> None:
    """train/loss and the chosen metric against tokens seen, one line per run (PNG, Agg backend)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PocketLMError("plots need matplotlib: pip install 'pocketlm[track]'") from None
    keys = ["train/loss"] + ([metric] if metric != "train/loss" else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for n, r in zip(names, rows):
            s = series(r, key)
            if s:
                ax.plot([t for _, t, _ in s], [v for _, _, v in s], label=n, marker="o" if len(s) < 30 else None,
                        markersize=3)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    file.parent.mkdir(parents=True, exist_ok=True)
    from pocketlm.atomic import atomic_open

    with atomic_open(file, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
