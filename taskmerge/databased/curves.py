"""Convergence evidence of a data-based run: its loss curve as JSON and PNG.

:func:`write_curve` writes, for one benchmark row, ``<folder>/<name>.json`` (the per-step loss, its parts,
the moving average, the seconds per step, the convergence check of :func:`taskmerge.databased.loop.tail_trend`,
MOMA's masking rate, the range of the learned λ) and ``<folder>/<name>.png`` (loss per step, its 10-step moving
average, the tail window of the check shaded).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from taskmerge.databased.loop import moving_average

__all__ = ["write_curve", "curve_record"]

_KEYS = ("method", "start_method", "adapt_split", "protocol", "uses_labels", "convergence", "masking_rate",
         "lambda_stats", "seconds_per_step")


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def curve_record(name: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """What the JSON file of a row's curve holds (see the module docstring)."""
    loss = list(row.get("loss", []))
    return {"name": name, **{k: row[k] for k in _KEYS if k in row}, "loss": loss, "loss_smoothed": moving_average(loss),
            "loss_parts": row.get("loss_parts", {}), "step_seconds": row.get("step_seconds", [])}


def write_curve(folder: str | Path, name: str, row: Mapping[str, Any]) -> dict[str, str]:
    """Write ``<folder>/<name>.json`` and ``.png`` for a benchmark row; returns both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / _file_name(name)
    record = curve_record(name, row)
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    loss, smooth = record["loss"], record["loss_smoothed"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(range(len(loss)), loss, color="0.75", lw=0.8, label="loss per step")
    ax.plot(range(len(smooth)), smooth, color="C0", lw=1.6, label="10-step mean")
    conv = record.get("convergence") or {}
    if conv.get("still_falling") is not None:
        ax.axvspan(len(loss) - conv["window"], len(loss) - 1, color="C1", alpha=0.15,
                   label=f"tail: {'still falling' if conv['still_falling'] else 'flat'}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{name} ({record.get('method', '')}, adapt on {record.get('adapt_split', '?')})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(fig)
    return {"json": str(stem.with_suffix(".json")), "png": str(stem.with_suffix(".png"))}
