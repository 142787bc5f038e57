"""The assistant guide's picture of the out-of-scope curve, drawn from benchmark results.

    python docs/scope_figure.py      # writes docs/images/scope-curve.png

Reads bench/results/assistant_eval-banking77.json and assistant_eval-hwu64.json (bench/assistant_eval.py):
for each dataset, the curve the assistant knows at start (validation split against its 100 out-of-scope
examples) and the curve the test measured, the default policy's limit and the catch the definition asks for,
and where the default policy and the old 95%-precision default landed on the test.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "docs" / "images" / "scope-curve.png"
DATASETS = {"banking77": ("Banking77", "#0969da"), "hwu64": ("HWU64", "#bf3989")}


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.6), dpi=120)
    for dataset, (name, colour) in DATASETS.items():
        result = json.loads((RESULTS / f"assistant_eval-{dataset}.json").read_text(encoding="utf-8"))["result"]
        curve = [p for p in result["curve"] if p["tuning_in_scope_rejected"] <= 0.3]
        for side, style, what in (
            ("tuning", "--", f"known at start (validation vs {result['own_examples']} examples)"),
            ("test", "-", "measured on the test (10 unseen intents)"),
        ):
            rejected = [p[f"{side}_in_scope_rejected"] for p in curve]
            axes.plot(
                rejected,
                [p[f"{side}_out_of_scope_caught"] for p in curve],
                style,
                color=colour,
                label=f"{name}: {what}",
            )
        for key, setting in result["settings"].items():
            if isinstance(setting, dict) and key.endswith("examples of its own") and "old" not in key:
                marker = "o"
            elif isinstance(setting, dict) and key.startswith("old default") and "no examples" in key:
                marker = "x"
            else:
                continue
            test = setting["test"]
            # Not clipped: the old default sits on the y axis (it turned away next to nothing).
            axes.plot(
                test["in_scope_rejected"], test["out_of_scope_caught"], marker, color=colour, ms=8, mew=2, clip_on=False
            )
    axes.axvline(0.05, color="#9a6700", linestyle=":", label="default: at most 5% of in-scope messages turned away")
    axes.axhline(0.85, color="#656d76", linestyle=":", label="scope.min_out_of_scope_caught (85%)")
    axes.plot([], [], "ko", label="default policy on the test")
    axes.plot([], [], "kx", label="old default (95% precision, no examples) on the test")
    axes.set_xlim(0, 0.3)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("in-scope messages turned away")
    axes.set_ylabel("out-of-scope messages caught")
    axes.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
    axes.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
