"""The ``kvx`` command: parse, call one library function, print. No logic lives here."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .convert.config import ConvertConfig
from .distill.config import DistillConfig
from .errors import KvxError
from .eval.config import EvalConfig
from .loading import DEFAULT_MODEL
from .profile.config import ProfileConfig

app = typer.Typer(
    help="kvx: upcycle a pretrained causal LM into one with a much smaller KV cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ModelArg = Annotated[str, typer.Argument(help=f"Local folder, Hub id, .gguf file or built-in alias ({DEFAULT_MODEL}).")]
OutOpt = Annotated[str, typer.Option("-o", "--out", help="Output folder.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace OUT if it exists.")]


def _option(name: str, hint, default, help: str, metavar: str | None = None) -> inspect.Parameter:
    flag = "--" + name.replace("_", "-")
    annotation = Annotated[hint, typer.Option(flag, help=help, metavar=metavar)]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _config_options(cls) -> list[inspect.Parameter]:
    """One typer option per field of a stage config, with the field's default and help."""
    from .config import config_fields

    params = []
    for f, hint in config_fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if meta.get("parse"):  # typed in as text, parsed into the field's type
            hint, default = str | None, None
        params.append(_option(f.name, hint, default, meta["help"], meta.get("text")))
    return params


def _build_config(cls, kwargs: dict):
    """The config from the command's keyword arguments (its fields are popped from ``kwargs``)."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            value = kwargs.pop(f.name)
            parse = f.metadata.get("parse")
            values[f.name] = parse(value) if parse else value
    return cls(**values)


def with_config(name: str, cls, extra: list[inspect.Parameter] = (), collect=None):
    """Give a command the options of a stage config; the command receives the config as ``name``.
    ``extra``: more options (``collect(config, their values)`` folds them into the config)."""

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)  # real Annotated objects, not strings: typer reads them
        own = [p for p in sig.parameters.values() if p.name != name]
        params = own + _config_options(cls) + list(extra)

        @functools.wraps(fn)
        def wrapper(**kwargs):
            extras = {p.name: kwargs.pop(p.name) for p in extra}
            try:
                config = _build_config(cls, kwargs)
                config = collect(config, extras) if collect else config
            except KvxError as e:
                _fail(str(e))
            return fn(**kwargs, **{name: config})

        wrapper.__signature__ = sig.replace(parameters=params)
        del wrapper.__wrapped__  # typer must read the new signature, not fn's
        return wrapper

    return decorate


def _shortcut_options() -> list[inspect.Parameter]:
    """The methods' shortcut options (``--kv-rank``, ``--sink``, ...), unset by default."""
    from .methods import shortcut_options

    return [_option(n, option.type | None, None, option.help) for n, (_, option) in shortcut_options().items()]


def _with_shortcuts(config, values: dict):
    return dataclasses.replace(config, options={k: v for k, v in values.items() if v is not None})


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextmanager
def _progress():
    """A rich progress display handed to library functions as ``progress(desc, total) -> advance``."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bars:

        def start(description: str, total: int):
            task = bars.add_task(description, total=total)
            if not console.is_terminal:
                console.print(f"{description} ...", highlight=False)

            def advance(n: int, info: str | None = None) -> None:
                bars.update(task, advance=n, description=f"{description} {info}" if info else description)

            return advance

        yield start


def _run(fn, *args, **kwargs):
    """Call a library function; user errors become one red line and exit code 2."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # transformers' own bars ("Loading weights")
    disable_progress_bars()  # huggingface_hub's ("Writing model shards"): kvx draws its own
    warnings.filterwarnings(
        "ignore", category=FutureWarning
    )  # libraries' deprecation notices: not the user's to act on
    try:
        return fn(*args, **kwargs)
    except KvxError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written")
    except OSError as e:  # the machine's circumstances (disk, permissions), not a bug: one line, not a traceback
        where = f" ({e.filename})" if e.filename else ""
        _fail(f"{e.strerror or e}{where}; nothing was written")


@app.command()
@with_config("cfg", ProfileConfig)
def profile(
    model: ModelArg = DEFAULT_MODEL, out: OutOpt = "", overwrite: OverwriteOpt = False, cfg: ProfileConfig = None
):
    """Profile every layer (lazy ratio, KV spectrum, RoPE pairs, cross-layer/-scale similarity) and suggest a plan."""
    from .profile.run import profile as run

    if not out:
        _fail("missing -o/--out: the folder for the report")
    with _progress() as progress:
        report = _run(run, model, out, cfg, overwrite=overwrite, progress=progress)
    from .plan import spec_from_dict, spec_string

    s = report["settings"]
    table = Table(
        title=f"kvx profile {report['model']}: {report['tokens']} tokens of {report['data']}, windows of {s['seq_len']}"
    )
    for col in (
        "layer",
        f"lazy ratio (sink {s['sink']} + last {s['window']})",
        "lazy rank",
        "rank 95% [K_nope;V]",
        f"top-{s['topk']} recall",
        "plan",
    ):
        table.add_column(col)
    for layer, spec in zip(report["layers"], report["suggested_plan"]["layers"]):
        table.add_row(
            str(layer["layer"]),
            f"{layer['lazy_ratio']:.3f}",
            str(layer["lazy_rank"]),
            f"{layer['spectrum']['joint']['rank_95']}/{layer['spectrum']['joint']['dims']}",
            f"{layer['topk_recall']:.3f}",
            spec_string(spec_from_dict(spec)),
        )
    Console().print(table)
    Console().print(
        f"Suggested plan: expected KV ratio {report['expected_kv_ratio']:.2f}x. Wrote: {', '.join(report['files'])}"
    )


@app.command()
@with_config("cfg", ConvertConfig, extra=_shortcut_options(), collect=_with_shortcuts)
def convert(
    model: ModelArg = DEFAULT_MODEL, out: OutOpt = "", overwrite: OverwriteOpt = False, cfg: ConvertConfig = None
):
    """Convert MODEL's attention layers to a smaller cache: --to mla (latent attention), streaming (sinks + window),
    condensed (layers that read another layer's K/V), evict (a fixed token budget, blocks kept by a policy),
    a spec like 'mla(kv_rank=60, rope_dims=36)', or --plan FILE."""
    from .convert.run import convert as run

    if not out:
        _fail("missing -o/--out: where to write the converted checkpoint")
    with _progress() as progress:
        result = _run(run, model, out, cfg, overwrite=overwrite, progress=progress)
    kv = result["kv"]
    table = Table(
        title=f"kvx convert -> {result['out']} (cache after {kv['tokens']} tokens)", caption=result["plan"].summary()
    )
    for col in ("KV bytes/token", "base", "measured", "plan", "ratio"):
        table.add_column(col)
    table.add_row(
        kv["dtype"],
        f"{kv['baseline']:.0f}",
        f"{kv['measured']:.0f}",
        f"{kv['spec']:.0f}",
        f"{kv['baseline'] / kv['measured']:.2f}x",
    )
    Console().print(table)
    for note in result["notes"]:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    if cfg.export:
        Console().print(f"{cfg.export} transformers checkpoint (no remote code): {result[cfg.export]}")


@app.command()
def export(
    checkpoint: Annotated[str, typer.Argument(help="A kvx checkpoint (all-MLA, --layout deepseek).")],
    format: Annotated[
        str, typer.Option("--format", help="Target layout: deepseek (DeepseekV3ForCausalLM).")
    ] = "deepseek",
    out: Annotated[str | None, typer.Option("-o", "--out", help="Output folder (default: CHECKPOINT-FORMAT).")] = None,
    overwrite: OverwriteOpt = False,
):
    """Re-lay a kvx checkpoint out in a format serving engines load without kvx (exact, no retraining)."""
    from .export import export_checkpoint

    path = _run(export_checkpoint, checkpoint, format, out, overwrite)
    Console().print(f"{format} checkpoint (transformers, no remote code): {path}")


@app.command()
@with_config("cfg", DistillConfig)
def distill(
    student: Annotated[
        str, typer.Argument(help="The converted model to heal (a kvx checkpoint, or any model with --teacher).")
    ],
    out: Annotated[
        str, typer.Option("-o", "--out", help="Output folder: the healed checkpoint, metrics.jsonl, checkpoints/.")
    ] = "",
    resume: Annotated[bool, typer.Option(help="Continue OUT from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start OUT over if it exists.")] = False,
    cfg: DistillConfig = None,
):
    """Heal a converted model with a short teacher distillation (accelerate: CPU, GPU, or accelerate launch)."""
    from .distill.run import distill as run

    if not out:
        _fail("missing -o/--out: where to write the healed checkpoint")
    with _progress() as progress:
        summary = _run(run, student, out, cfg, resume=resume, overwrite=overwrite, progress=progress)
    if "texts" in summary:
        per_text = "; ".join(
            f"{text} {r['before']:.3f} -> {r['after']:.3f} (teacher {r['teacher']:.3f})"
            for text, r in summary["texts"].items()
        )
        Console().print(f"{summary['steps']} steps in {summary['seconds']:.0f} s: perplexity {per_text}. Wrote {out}")


@app.command("eval")
@with_config("cfg", EvalConfig)
def eval_(
    model: ModelArg = DEFAULT_MODEL,
    baseline: Annotated[str | None, typer.Option(help="Model to compare against (same data, same windows).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    cfg: EvalConfig = None,
):
    """Perplexity and KV-cache bytes per token (from the plan and measured), optionally vs a baseline."""
    from .eval.run import evaluate

    with _progress() as progress:
        result = _run(evaluate, model, baseline, cfg, progress=progress)
    if json_out:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"kvx eval on {cfg.data} ({result['model']['tokens']} tokens, windows of {cfg.seq_len})")
    for col in ("model", "perplexity", "KV bytes/token (measured)", "KV bytes/token (plan)"):
        table.add_column(col)
    for key in ("baseline", "model"):
        if key in result:
            r = result[key]
            table.add_row(
                r["name"], f"{r['ppl']:.3f}", f"{r['kv_bytes_per_token']:.0f}", f"{r['kv_bytes_per_token_spec']:.0f}"
            )
    Console().print(table)
    if "kv_ratio" in result:
        Console().print(
            f"KV ratio (baseline / model): {result['kv_ratio']:.2f}x   ppl ratio (model / baseline): "
            f"{result['ppl_ratio']:.3f}"
        )
    if result["model"].get("long"):
        long_table = Table(title=f"long documents: perplexity of the last {cfg.long_tail} tokens")
        for col in (
            "model",
            "context",
            "docs",
            "tail perplexity",
            "KV bytes/token (measured)",
            "KV bytes/token (plan)",
        ):
            long_table.add_column(col)
        for key in ("baseline", "model"):
            for ctx, r in result.get(key, {}).get("long", {}).items():
                long_table.add_row(
                    result[key]["name"],
                    ctx,
                    str(r["docs"]),
                    f"{r['ppl_tail']:.3f}",
                    f"{r['kv_bytes_per_token']:.0f}",
                    f"{r['kv_bytes_per_token_spec']:.0f}",
                )
        Console().print(long_table)
    _print_judgement(
        {"baseline": result["baseline"], "model": result["model"]}
        if "baseline" in result
        else {"model": result["model"]}
    )


def _print_table(title: str, header: list[str], lines: list[list[str]]) -> None:
    table = Table(title=title)
    for col in header:
        table.add_column(col)
    for line in lines:
        table.add_row(*line)
    Console().print(table)


def _print_judgement(rows: dict) -> None:
    """Downstream tasks and generation agreement of evaluated rows (first row = reference)."""
    from .eval.report import agreement_table, task_table

    header, lines = task_table(rows)
    if header:
        _print_table("downstream tasks, zero-shot (lm-eval); ± standard error", header, lines)
    header, lines, samples = agreement_table(rows)
    if header:
        _print_table("greedy generation against the first row", header, lines)
        for s in samples:
            Console().print(f"[bold]prompt[/bold] …{s['prompt'][-80:]!r}", highlight=False)
            Console().print(f"  [bold]{list(rows)[0]}[/bold] {s['baseline']!r}", highlight=False)
            Console().print(f"  [bold]{s['label']}[/bold] {s['model']!r}", highlight=False)


@app.command()
def run(
    recipe: Annotated[
        str | None, typer.Argument(help="A recipe YAML file or a built-in recipe's name (see --list).")
    ] = None,
    out: Annotated[
        str, typer.Option("-o", "--out", help="Folder for every stage's output (re-running skips finished stages).")
    ] = "",
    list_: Annotated[bool, typer.Option("--list", help="List the built-in recipes and exit.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start OUT over instead of continuing it.")] = False,
):
    """Run a recipe: profile -> convert -> distill -> eval, each stage's output kept in OUT."""
    from .recipe import builtin_recipes, load_recipe, run_recipe

    if list_:
        table = Table(title="built-in recipes (kvx run NAME -o DIR)")
        for col in ("name", "model", "what it does"):
            table.add_column(col)
        for name in builtin_recipes():
            r = _run(load_recipe, name)
            table.add_row(name, r.model, r.description)
        Console().print(table)
        return
    if recipe is None:
        _fail("missing RECIPE (a YAML file or a built-in name; `kvx run --list` shows them)")
    if not out:
        _fail("missing -o/--out: the folder for the stages' outputs")
    r = _run(load_recipe, recipe)
    with _progress() as progress:
        result = _run(
            run_recipe,
            r,
            out,
            progress=progress,
            say=lambda m: console.print(m, highlight=False, markup=False),
            overwrite=overwrite,
        )
    rows = result["rows"]
    table = Table(title=f"kvx run {r.name}: {result['data']} evaluation ({out}/eval.json)")
    for col in ("model", "perplexity", "KV bytes/token", "KV cut vs original"):
        table.add_column(col)
    base_kv = rows["original"]["kv_bytes_per_token"]
    for label, row in rows.items():
        table.add_row(
            f"{label} ({row['name']})",
            f"{row['ppl']:.3f}",
            f"{row['kv_bytes_per_token']:.0f}",
            f"{base_kv / row['kv_bytes_per_token']:.2f}x",
        )
    for ctx in rows["original"].get("long", {}):  # long documents: tail perplexity at that context
        long_base = rows["original"]["long"][ctx]["kv_bytes_per_token"]
        for label, row in rows.items():
            r = row["long"][ctx]
            table.add_row(
                f"{label}, {ctx}-token context (tail)",
                f"{r['ppl_tail']:.3f}",
                f"{r['kv_bytes_per_token']:.0f}",
                f"{long_base / r['kv_bytes_per_token']:.2f}x",
            )
    Console().print(table)
    _print_judgement(rows)


@app.command()
def push(
    folder: Annotated[str, typer.Argument(help="A checkpoint folder (kvx convert/distill output, or a kvx export).")],
    repo: Annotated[str, typer.Option(help="Hub repository USER/NAME (created if missing).")],
    private: Annotated[bool, typer.Option(help="Create the repository private.")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to push to (created if missing; default main).")] = None,
    dry_run: Annotated[
        bool, typer.Option(help="Show the files, commit message and model card; upload nothing.")
    ] = False,
):
    """Push a checkpoint and its model card (plan, eval table, distillation run) to the Hub in one commit."""
    from .hub import push as run

    result = _run(run, folder, repo, private, revision, dry_run)
    if not dry_run:
        Console().print(f"pushed: {result}")
        return
    Console().print(
        f"would push {len(result.files) + 1} files to {result.repo_id}"
        + (f"@{result.revision}" if result.revision else "")
        + f" ({'private' if result.private else 'public'}), commit message: {result.commit_message!r}"
    )
    for f in result.files + ["README.md (generated)"]:
        Console().print(f"  {f}", highlight=False)
    Console().print(result.card, markup=False, highlight=False)


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
