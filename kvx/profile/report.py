"""Write a profile: report.json, PNG plots a person would rather look at, and plan.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _bar(path: Path, values: list[float], title: str, ylabel: str, highlight: set[int] | None = None) -> None:
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(values)), 3.4))
    colors = ["tab:orange" if highlight and i in highlight else "tab:blue" for i in range(len(values))]
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks(range(0, len(values), max(1, len(values) // 15)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _heatmaps(path: Path, mats: dict[str, list[list[float]]], title: str, xlabel: str, ylabel: str) -> None:
    fig, axes = plt.subplots(1, len(mats), figsize=(5.2 * len(mats), 4.4), squeeze=False)
    for ax, (name, mat) in zip(axes[0], mats.items()):
        im = ax.imshow(mat, cmap="viridis", vmin=min(0.0, min(map(min, mat))), vmax=1.0, origin="lower")
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        fig.colorbar(im, ax=ax, fraction=0.046, label="cosine similarity")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, plan, out: Path) -> list[Path]:
    """Write every artefact into ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    layers = report["layers"]
    written = [out / "report.json", out / "plan.yaml"]
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plan.to_yaml(out / "plan.yaml")

    s = report["settings"]
    streaming = {i for i, spec in enumerate(report["suggested_plan"]["layers"]) if spec["kind"] == "streaming"}
    _bar(
        out / "lazy_ratio.png",
        [layer["lazy_ratio"] for layer in layers],
        f"Lazy ratio: attention on {s['sink']} sink + last {s['window']} tokens (orange: planned streaming)",
        "share of attention mass",
        streaming,
    )
    _bar(
        out / "rank95.png",
        [layer["spectrum"]["joint"]["rank_95"] for layer in layers],
        f"Latent rank for 95% of [K_nope; V] energy (rope dims {s['rope_dims']})",
        "rank",
    )
    _heatmaps(
        out / "cross_layer_similarity.png",
        {"K": report["cross_layer_similarity"]["k"], "V": report["cross_layer_similarity"]["v"]},
        "Cross-layer similarity of cached K and V (per token)",
        "layer",
        "layer",
    )
    written += [out / "lazy_ratio.png", out / "rank95.png", out / "cross_layer_similarity.png"]
    if "cross_scale" in report:
        cs = report["cross_scale"]
        _heatmaps(
            out / "cross_scale_similarity.png",
            {"head-averaged": cs["head_averaged"], "best head": cs["best_head"]},
            f"Attention-map similarity vs {cs['reference']} (IAM)",
            "reference layer",
            "layer",
        )
        written.append(out / "cross_scale_similarity.png")
    return written
