"""``kvx distill``: heal STUDENT towards its teacher, and write the healed checkpoint into OUT."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ..arch import get_adapter
from ..checkpoint import save_checkpoint, writes_output
from ..data import token_windows
from ..errors import KvxError
from ..generate import sampled_tokens
from ..hub import model_card
from ..loading import load_model, resolve
from ..measure.kv import kv_bytes_per_token, kv_bytes_per_token_spec
from ..measure.perplexity import perplexity
from ..plan import Plan
from ..progress import Progress, no_progress
from .config import DistillConfig
from .data import training_windows
from .loop import run_distill


def _move_into(src: Path, dst: Path) -> None:
    """Move a finished checkpoint's files into ``dst`` (which holds logs), config.json last:
    until it lands, ``dst`` is not a loadable model, so it is never a half-written one."""
    dst.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in src.iterdir())
    for name in [n for n in names if n != "config.json"] + ["config.json"]:
        target = dst / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(src / name, target)
    shutil.rmtree(src, ignore_errors=True)


@writes_output  # one writer per output folder: its checkpoints and logs are ours alone
def distill(
    student: str,
    out: str | Path,
    cfg: DistillConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress = no_progress,
    **options,
) -> dict:
    """``kvx distill``: train STUDENT towards TEACHER (default: the model it was converted from)."""
    cfg = cfg or DistillConfig(**options)
    cfg.check()
    out = Path(out)
    data, tokens, seq_len, seed = cfg.data, cfg.tokens, cfg.seq_len, cfg.seed
    if resume and not out.exists():
        raise KvxError(f"--resume: {out} does not exist")
    if out.exists() and not resume:
        if not overwrite:
            raise KvxError(f"output {out} already exists (pass --resume to continue it or --overwrite to start over)")
        shutil.rmtree(out)
    s_model, tok, s_name = load_model(student)
    plan = Plan.from_config(s_model.config)
    teacher = cfg.teacher or plan.meta.get("source")
    if teacher is None:
        raise KvxError(f"{student} records no source model: pass --teacher")
    t_model, t_tok, t_name = load_model(teacher)
    if t_tok.get_vocab() != tok.get_vocab():
        raise KvxError(f"teacher {teacher} has another vocabulary than the student: logits cannot be compared")
    windows = training_windows(
        t_model,
        tok,
        data,
        tokens,
        seq_len,
        seed,
        progress("teacher writes text", sampled) if (sampled := sampled_tokens(data, tokens)) else None,
        cache_key=resolve(teacher)[0],
    )
    evals = {text: token_windows(tok, text, "eval", cfg.eval_tokens, seq_len) for text in cfg.eval_texts()}
    eval_windows = next(iter(evals.values()))  # the first text's figures are the headline ones
    before = {text: perplexity(s_model, w) for text, w in evals.items()}
    ppl_before = next(iter(before.values()))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    res = run_distill(s_model, t_model, windows, evals, cfg, out, plan, get_adapter(s_model.config), resume, progress)
    accelerator, trained = res["accelerator"], res["student"]
    summary = {"steps": res["steps"], "ppl_before": ppl_before, "seconds": time.perf_counter() - started}
    if accelerator.is_main_process:
        device = accelerator.device
        summary["texts"] = {
            text: {
                "before": before[text],
                "after": perplexity(trained, w.to(device)),
                "teacher": perplexity(t_model, w.to(device)),
            }
            for text, w in evals.items()
        }
        first = next(iter(summary["texts"].values()))
        summary["ppl_after"], summary["ppl_teacher"] = first["after"], first["teacher"]
        probe = eval_windows[:1].to(accelerator.device)
        kv = {
            "baseline": kv_bytes_per_token(t_model, probe),
            "measured": kv_bytes_per_token(trained, probe),
            "spec": kv_bytes_per_token_spec(trained, probe.shape[-1]),
            "tokens": probe.shape[-1],
            "dtype": str(next(trained.parameters()).dtype).replace("torch.", ""),
        }
        trained_tokens = res["steps"] * cfg.batch_size * cfg.grad_accum * seq_len * accelerator.num_processes
        plan.meta["distillation"] = {
            "teacher": teacher,
            "data": data,
            "tokens": trained_tokens,
            "loss": cfg.loss,
            "train": cfg.train,
            "train_also": list(cfg.modules_also()),
        }
        if getattr(trained.config, "kvx", None):
            trained.config.kvx = {**trained.config.kvx, "distillation": plan.meta["distillation"]}
        extra = {
            "distillation": f"{trained_tokens} tokens of {data} from {teacher}, loss {cfg.loss}, trained {cfg.train}"
            + "".join(f" + {m}" for m in cfg.modules_also())
            + f", {summary['seconds']:.0f} s",
        }
        for text, r in summary["texts"].items():
            extra[f"perplexity on {text} (eval part)"] = (
                f"{r['before']:.3f} before, {r['after']:.3f} after, teacher {r['teacher']:.3f}"
            )
        final = out.parent / f".{out.name}.final-tmp"
        if final.exists():
            shutil.rmtree(final)
        save_checkpoint(trained, tok, final, lambda _: model_card(plan.base_model or s_name, plan, kv, extra))
        _move_into(final, out)
        written = out / ".distill_summary.json.tmp"  # the recipe's "distill finished" mark: whole or absent
        written.write_text(json.dumps(summary, indent=2))
        written.replace(out / "distill_summary.json")
    accelerator.wait_for_everyone()
    return summary
