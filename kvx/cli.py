"""The ``kvx`` command: parse, call one library function, print. No logic lives here."""

from __future__ import annotations

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

from .errors import KvxError
from .loading import DEFAULT_MODEL

app = typer.Typer(
    help="kvx: upcycle a pretrained causal LM into one with a much smaller KV cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ModelArg = Annotated[
    str, typer.Argument(help=f"Local folder, Hub id, .gguf file or built-in alias ({DEFAULT_MODEL}).")
]
DataOpt = Annotated[str, typer.Option(help="Text: 'bundled', a file/folder, or hf:NAME[:CONFIG][:SPLIT].")]


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
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notices: not the user's to act on
    try:
        return fn(*args, **kwargs)
    except KvxError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written")


@app.command()
def profile(
    model: ModelArg = DEFAULT_MODEL,
    out: Annotated[str, typer.Option("-o", "--out", help="Folder for report.json, PNG plots and plan.yaml.")] = "",
    data: DataOpt = "bundled",
    tokens: Annotated[int, typer.Option(help="Tokens to profile (from DATA's calibration part).")] = 8192,
    seq_len: Annotated[int, typer.Option(help="Sequence length of each profiled window.")] = 1024,
    reference: Annotated[
        str | None, typer.Option(help="A smaller model of the same family and tokenizer: cross-scale attention similarity (IAM).")
    ] = None,
    sink: Annotated[int, typer.Option(help="Attention-sink tokens for the lazy ratio.")] = 4,
    window: Annotated[int | None, typer.Option(help="Recent-window tokens for the lazy ratio (default seq_len/8).")] = None,
    topk: Annotated[int, typer.Option(help="k of the step-to-step top-k recall.")] = 16,
    rope_dims: Annotated[int | None, typer.Option(help="RoPE dims per token and layer the plan keeps (default: 3/8 of the budget).")] = None,
    target_kv_ratio: Annotated[float, typer.Option(help="KV-size cut the suggested plan aims for.")] = 4.0,
    streaming: Annotated[bool, typer.Option(help="Let the plan make the laziest layers streaming (sinks + window).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
):
    """Profile every layer (lazy ratio, KV spectrum, RoPE pairs, cross-layer/-scale similarity) and suggest a plan."""
    from .pipeline import profile as run

    if not out:
        _fail("missing -o/--out: the folder for the report")
    with _progress() as progress:
        report = _run(
            run,
            model,
            out,
            data=data,
            tokens=tokens,
            seq_len=seq_len,
            reference=reference,
            sink=sink,
            window=window,
            topk=topk,
            rope_dims=rope_dims,
            target_kv_ratio=target_kv_ratio,
            streaming=streaming,
            overwrite=overwrite,
            progress=progress,
        )
    s = report["settings"]
    table = Table(title=f"kvx profile {report['model']}: {report['tokens']} tokens of {report['data']}, windows of {s['seq_len']}")
    for col in ("layer", f"lazy ratio (sink {s['sink']} + last {s['window']})", "lazy rank", "rank 95% [K_nope;V]", f"top-{s['topk']} recall", "plan"):
        table.add_column(col)
    plan_layers = report["suggested_plan"]["layers"]
    for layer, spec in zip(report["layers"], plan_layers):
        shown = spec["kind"] if spec["kind"] != "mla" else f"mla({spec['kv_rank']}, {spec['rope_dims']})"
        table.add_row(
            str(layer["layer"]), f"{layer['lazy_ratio']:.3f}", str(layer["lazy_rank"]),
            f"{layer['spectrum']['joint']['rank_95']}/{layer['spectrum']['joint']['dims']}", f"{layer['topk_recall']:.3f}", shown,
        )
    Console().print(table)
    Console().print(f"Suggested plan: expected KV ratio {report['expected_kv_ratio']:.2f}x. Wrote: {', '.join(report['files'])}")


@app.command()
def convert(
    model: ModelArg = DEFAULT_MODEL,
    to: Annotated[str, typer.Option("--to", help="Target attention: 'mla' or 'streaming'.")] = "mla",
    out: Annotated[str, typer.Option("-o", "--out", help="Output checkpoint folder.")] = "",
    kv_rank: Annotated[str, typer.Option(help="Latent floats per token and layer, or 'full' (lossless).")] = "full",
    rope_dims: Annotated[
        str, typer.Option(help="RoPE key floats per token and layer (all KV heads together), or 'all'.")
    ] = "all",
    rope_select: Annotated[
        str | None, typer.Option(help="Which frequency pairs to keep: 2norm (default with calibration), high, low, uniform.")
    ] = None,
    calib: Annotated[str, typer.Option(help="Calibration text (as --data), or 'none' for weights-only SVD.")] = "bundled",
    calib_tokens: Annotated[int, typer.Option(help="Calibration tokens.")] = 16384,
    layers: Annotated[
        str | None, typer.Option(help="Layers to convert, e.g. '0-9,20' (mla default: all); streaming also 'auto' (laziest half) or a fraction like 0.25.")
    ] = None,
    sink: Annotated[int, typer.Option(help="streaming: attention-sink tokens kept.")] = 4,
    window: Annotated[int, typer.Option(help="streaming: recent tokens kept.")] = 1020,
    plan: Annotated[str | None, typer.Option(help="A per-layer plan (plan.yaml from kvx profile) instead of the options above.")] = None,
    layout: Annotated[
        str, typer.Option(help="mla: kvx (a RoPE key per KV head), shared (one RoPE key for all heads) or deepseek (shared + latent norm: DeepSeek-V3's attention).")
    ] = "kvx",
    export: Annotated[
        str | None, typer.Option(help="Also write OUT-native or OUT-deepseek: 'native' = base weights + transformers layer_types (full + sink-free streaming plans, Qwen2/Qwen3); 'deepseek' = DeepseekV3ForCausalLM (all-MLA, implies --layout deepseek).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
):
    """Convert MODEL's attention layers: MLA (SVD/PCA-initialised latent attention) or streaming (sinks + window)."""
    from .pipeline import convert_to_mla, convert_to_streaming

    if to not in ("mla", "streaming"):
        _fail(f"--to {to!r} is not implemented yet (available: mla, streaming)")
    if not out:
        _fail("missing -o/--out: where to write the converted checkpoint")
    if plan is not None and (kv_rank != "full" or rope_dims != "all" or layers is not None or rope_select is not None or layout != "kvx"):
        _fail("--plan sets every layer: drop --kv-rank, --rope-dims, --rope-select, --layout and --layers")
    with _progress() as progress:
        if to == "streaming" and plan is None:
            result = _run(
                convert_to_streaming, model, out, layers or "auto", sink, window, data=calib if calib != "none" else "bundled",
                overwrite=overwrite, progress=progress, export=export,
            )
        else:
            result = _run(
                convert_to_mla,
                model,
                out,
                kv_rank=kv_rank,
                rope_dims=rope_dims,
                rope_select=rope_select,
                calib=calib,
                calib_tokens=calib_tokens,
                layers=layers,
                overwrite=overwrite,
                progress=progress,
                plan=plan,
                export=export,
                layout=layout,
            )
    kv = result["kv"]
    table = Table(title=f"kvx convert -> {result['out']} (cache after {kv['tokens']} tokens)", caption=result["plan"].summary())
    for col in ("KV bytes/token", "base", "measured", "plan", "ratio"):
        table.add_column(col)
    table.add_row(
        kv["dtype"], f"{kv['baseline']:.0f}", f"{kv['measured']:.0f}", f"{kv['spec']:.0f}", f"{kv['baseline'] / kv['measured']:.2f}x"
    )
    Console().print(table)
    for note in result["notes"]:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    for fmt in ("native", "deepseek"):
        if fmt in result:
            Console().print(f"{fmt} transformers checkpoint (no remote code): {result[fmt]}")


@app.command()
def export(
    checkpoint: Annotated[str, typer.Argument(help="A kvx checkpoint (all-MLA, --layout deepseek).")],
    format: Annotated[str, typer.Option("--format", help="Target layout: deepseek (DeepseekV3ForCausalLM).")] = "deepseek",
    out: Annotated[str | None, typer.Option("-o", "--out", help="Output folder (default: CHECKPOINT-FORMAT).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
):
    """Re-lay a kvx checkpoint out in a format serving engines load without kvx (exact, no retraining)."""
    from .export import export_checkpoint

    path = _run(export_checkpoint, checkpoint, format, out, overwrite)
    Console().print(f"{format} checkpoint (transformers, no remote code): {path}")


@app.command()
def distill(
    student: Annotated[str, typer.Argument(help="The converted model to heal (a kvx checkpoint, or any model with --teacher).")],
    out: Annotated[str, typer.Option("-o", "--out", help="Output folder: the healed checkpoint, metrics.jsonl, checkpoints/.")] = "",
    teacher: Annotated[str | None, typer.Option(help="Teacher (default: the model STUDENT was converted from); same tokenizer.")] = None,
    data: Annotated[str, typer.Option(help="Training text: 'bundled', a file/folder, hf:NAME, or 'teacher' (text the teacher writes).")] = "bundled",
    tokens: Annotated[int, typer.Option(help="Training tokens.")] = 262_144,
    seq_len: Annotated[int, typer.Option(help="Sequence length.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Sequences per batch (per process).")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Batches per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (linear warm-up 5%, linear decay).")] = 1e-4,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the KL.")] = 1.0,
    loss: Annotated[str, typer.Option(help="kl | kl+ce | kl+hidden.")] = "kl",
    train: Annotated[str, typer.Option(help="converted (only weights the conversion created) | all | lora.")] = "converted",
    eval_every: Annotated[int, typer.Option(help="Evaluation perplexity every K steps (0: only at the end).")] = 0,
    save_every: Annotated[int, typer.Option(help="Resumable checkpoint every K steps (0: none).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue OUT from its last checkpoint.")] = False,
    mixed_precision: Annotated[str, typer.Option(help="no | bf16 | fp16 (accelerate).")] = "no",
    lora_rank: Annotated[int, typer.Option(help="LoRA rank for --train lora.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the data order and sampling.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Start OUT over if it exists.")] = False,
):
    """Heal a converted model with a short teacher distillation (accelerate: CPU, GPU, or accelerate launch)."""
    from .pipeline import distill as run

    if not out:
        _fail("missing -o/--out: where to write the healed checkpoint")
    with _progress() as progress:
        summary = _run(
            run, student, out, teacher=teacher, data=data, tokens=tokens, seq_len=seq_len, batch_size=batch_size,
            grad_accum=grad_accum, lr=lr, temperature=temperature, loss=loss, train=train, eval_every=eval_every,
            save_every=save_every, resume=resume, overwrite=overwrite, seed=seed, mixed_precision=mixed_precision, lora_rank=lora_rank,
            progress=progress,
        )
    if "ppl_after" in summary:
        Console().print(
            f"{summary['steps']} steps in {summary['seconds']:.0f} s: perplexity {summary['ppl_before']:.3f} -> "
            f"{summary['ppl_after']:.3f} (teacher {summary['ppl_teacher']:.3f}). Wrote {out}"
        )


@app.command("eval")
def eval_(
    model: ModelArg = DEFAULT_MODEL,
    baseline: Annotated[str | None, typer.Option(help="Model to compare against (same data, same windows).")] = None,
    data: DataOpt = "bundled",
    max_tokens: Annotated[int, typer.Option(help="Evaluation tokens.")] = 8192,
    seq_len: Annotated[int, typer.Option(help="Window length (tokens).")] = 512,
    long: Annotated[
        str | None, typer.Option(help="Long contexts to evaluate too, e.g. '4096,8192': tail perplexity of long documents and cache bytes.")
    ] = None,
    long_tail: Annotated[int, typer.Option(help="Tokens at the end of each long prefix whose loss is measured.")] = 1024,
    long_docs: Annotated[int, typer.Option(help="Long documents per context.")] = 4,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
):
    """Perplexity and KV-cache bytes per token (from the plan and measured), optionally vs a baseline."""
    from .pipeline import evaluate

    with _progress() as progress:
        try:
            contexts = [int(c) for c in long.split(",")] if long else None
        except ValueError:
            _fail(f"--long takes token counts like '4096,8192', not {long!r}")
        result = _run(
            evaluate, model, baseline, data, max_tokens, seq_len, contexts, long_tail, long_docs, progress=progress
        )
    if json_out:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"kvx eval on {data} ({result['model']['tokens']} tokens, windows of {seq_len})")
    for col in ("model", "perplexity", "KV bytes/token (measured)", "KV bytes/token (plan)"):
        table.add_column(col)
    for key in ("baseline", "model"):
        if key in result:
            r = result[key]
            table.add_row(r["name"], f"{r['ppl']:.3f}", f"{r['kv_bytes_per_token']:.0f}", f"{r['kv_bytes_per_token_spec']:.0f}")
    Console().print(table)
    if "kv_ratio" in result:
        Console().print(f"KV ratio (baseline / model): {result['kv_ratio']:.2f}x   ppl ratio (model / baseline): {result['ppl_ratio']:.3f}")
    if result["model"].get("long"):
        long_table = Table(title=f"long documents: perplexity of the last {long_tail} tokens")
        for col in ("model", "context", "docs", "tail perplexity", "KV bytes/token (measured)", "KV bytes/token (plan)"):
            long_table.add_column(col)
        for key in ("baseline", "model"):
            for ctx, r in result.get(key, {}).get("long", {}).items():
                long_table.add_row(
                    result[key]["name"], ctx, str(r["docs"]), f"{r['ppl_tail']:.3f}",
                    f"{r['kv_bytes_per_token']:.0f}", f"{r['kv_bytes_per_token_spec']:.0f}",
                )
        Console().print(long_table)


@app.command()
def run(
    recipe: Annotated[str | None, typer.Argument(help="A recipe YAML file or a built-in recipe's name (see --list).")] = None,
    out: Annotated[str, typer.Option("-o", "--out", help="Folder for every stage's output (re-running skips finished stages).")] = "",
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
        result = _run(run_recipe, r, out, progress=progress, say=lambda m: console.print(m, highlight=False, markup=False), overwrite=overwrite)
    rows = result["rows"]
    table = Table(title=f"kvx run {r.name}: {result['data']} evaluation ({out}/eval.json)")
    for col in ("model", "perplexity", "KV bytes/token", "KV cut vs original"):
        table.add_column(col)
    base_kv = rows["original"]["kv_bytes_per_token"]
    for label, row in rows.items():
        table.add_row(f"{label} ({row['name']})", f"{row['ppl']:.3f}", f"{row['kv_bytes_per_token']:.0f}", f"{base_kv / row['kv_bytes_per_token']:.2f}x")
    for ctx in rows["original"].get("long", {}):  # long documents: tail perplexity at that context
        long_base = rows["original"]["long"][ctx]["kv_bytes_per_token"]
        for label, row in rows.items():
            r = row["long"][ctx]
            table.add_row(f"{label}, {ctx}-token context (tail)", f"{r['ppl_tail']:.3f}", f"{r['kv_bytes_per_token']:.0f}", f"{long_base / r['kv_bytes_per_token']:.2f}x")
    Console().print(table)


@app.command()
def push(
    folder: Annotated[str, typer.Argument(help="A checkpoint folder (kvx convert/distill output, or a kvx export).")],
    repo: Annotated[str, typer.Option(help="Hub repository USER/NAME (created if missing).")],
    private: Annotated[bool, typer.Option(help="Create the repository private.")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to push to (created if missing; default main).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Show the files, commit message and model card; upload nothing.")] = False,
):
    """Push a checkpoint and its model card (plan, eval table, distillation run) to the Hub in one commit."""
    from .hub import push as run

    result = _run(run, folder, repo, private, revision, dry_run)
    if not dry_run:
        Console().print(f"pushed: {result}")
        return
    Console().print(f"would push {len(result.files) + 1} files to {result.repo_id}" + (f"@{result.revision}" if result.revision else "")
                    + f" ({'private' if result.private else 'public'}), commit message: {result.commit_message!r}")
    for f in result.files + ["README.md (generated)"]:
        Console().print(f"  {f}", highlight=False)
    Console().print(result.card, markup=False, highlight=False)


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
