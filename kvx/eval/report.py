"""Evaluation rows as tables (header + rows of text), for the CLI and the model card alike.

Rows are ``{label: row}`` in display order, the first being the reference (``kvx eval``'s
baseline, ``kvx run``'s original): shares kept and agreement are against it.
"""

from __future__ import annotations

from .agreement import agreement


def primary(row: dict) -> tuple[str, float]:
    """The metric a task is read by: ``acc_norm`` where lm-eval has it (length-normalised
    choices), else ``acc``, as lm-eval-harness tables report them; else the task's first metric."""
    names = [m for m in row if m != "n" and not m.endswith("_stderr")]
    metric = next((m for m in ("acc_norm", "acc") if m in row), names[0])
    return metric, row[metric]


def task_table(rows: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """One line per task (and their mean): each model's score, and each later model's share of the first's."""
    labels = [label for label, row in rows.items() if row.get("tasks")]
    if not labels:
        return [], []
    ref = labels[0]
    header = ["task", "metric", "n"] + labels + [f"{label} / {ref}" for label in labels[1:]]
    lines, means = [], {label: [] for label in labels}
    for task, ref_row in rows[ref]["tasks"].items():
        metric, _ = primary(ref_row)
        line = [task, metric, str(ref_row["n"])]
        for label in labels:
            r = rows[label]["tasks"][task]
            means[label].append(r[metric])
            err = r.get(f"{metric}_stderr")
            line.append(f"{r[metric]:.3f}" + (f" ± {err:.3f}" if err is not None else ""))
        line += [_share(rows[label]["tasks"][task][metric], ref_row[metric]) for label in labels[1:]]
        lines.append(line)
    if len(lines) > 1:
        avg = {label: sum(v) / len(v) for label, v in means.items()}
        lines.append(
            ["mean", "", ""]
            + [f"{avg[label]:.3f}" for label in labels]
            + [_share(avg[label], avg[ref]) for label in labels[1:]]
        )
    return header, lines


def _share(value: float, ref: float) -> str:
    return f"{value / ref:.1%}" if ref else "n/a"


def agreement_table(rows: dict[str, dict]) -> tuple[list[str], list[list[str]], list[dict]]:
    """Each later model's greedy continuations against the first's, and the first model's samples."""
    labels = [label for label, row in rows.items() if row.get("generations")]
    if len(labels) < 2:
        return [], [], []
    ref = rows[labels[0]]["generations"]
    header = ["model", "prompts", "tokens each", "agreement", "exact match", "mean agreed tokens"]
    lines, samples = [], []
    for label in labels[1:]:
        a = agreement(rows[label]["generations"], ref)
        lines.append(
            [
                label,
                str(a["prompts"]),
                str(a["new_tokens"]),
                f"{a['agreement']:.1%}",
                f"{a['exact_match']:.1%}",
                f"{a['tokens_before_divergence']:.1f}",
            ]
        )
        samples += [{"label": label, **s} for s in a["samples"][:1]]
    return header, lines, samples


def markdown(header: list[str], lines: list[list[str]]) -> list[str]:
    if not header:
        return []
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return out + ["| " + " | ".join(line) + " |" for line in lines]
