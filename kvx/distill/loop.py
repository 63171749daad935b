"""The distillation loop, on accelerate: one CPU, one GPU, or ``accelerate launch`` across many.

Resumable exactly: the training order is a fixed permutation of the windows (from the seed),
checkpoints are accelerate states (model, optimizer, scheduler, RNG) written to a temporary
folder and renamed, and a resumed run skips the batches already seen.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..errors import KvxError
from ..io.staging import note, pause_point
from ..measure.perplexity import perplexity
from .config import DistillConfig
from .losses import distill_loss


def with_lora(model, targets: list[str], rank: int):
    """Wrap ``model`` with peft LoRA adapters on ``targets`` (merged back at the end)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, bias="none")
    return get_peft_model(model, config)


def converted_parameter_names(model, plan, adapter, also: tuple[str, ...] = ()) -> list[str]:
    """Names of the parameters each layer's method says distillation trains (``Method.trainable``),
    plus, in each layer that trains something, its own copies of the projections in ``also``."""
    from ..methods import method_of

    def own(i: int, spec) -> tuple[str, ...]:
        modules = method_of(spec).trainable(spec, i)
        return modules + tuple(m for m in also if modules and m not in modules)

    wanted = tuple(
        f"{adapter.attention_prefix(i)}{module}." for i, spec in enumerate(plan.layers) for module in own(i, spec)
    ) + tuple(p for i, spec in enumerate(plan.layers) for p in method_of(spec).trainable_elsewhere(spec, i, adapter))
    # peft wraps the model (``base_model.model.`` in front), so a name contains the path rather than starts with it
    return [n for n, _ in model.named_parameters() if any(w in n for w in wanted)]


def select_trainable(model, mode: str, plan, adapter, also: tuple[str, ...] = ()) -> list[torch.nn.Parameter]:
    """``converted``: only what the conversion created (each method's ``trainable``), plus the converted
    layers' projections in ``also``; ``all``: everything; ``lora``: the LoRA adapters (already in
    ``model``) plus what ``converted`` trains."""
    converted = set(converted_parameter_names(model, plan, adapter, also)) if mode in ("converted", "lora") else set()
    for name, p in model.named_parameters():
        p.requires_grad_(mode == "all" or name in converted or (mode == "lora" and "lora_" in name))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise KvxError("nothing to train: the plan created no weights (streaming only?); use --train all or lora")
    return params


def _latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = [p for p in ckpt_root.glob("step-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def run_distill(
    student,
    teacher,
    windows,
    eval_windows: dict,
    cfg: DistillConfig,
    out: Path,
    plan,
    adapter,
    resume: bool = False,
    progress=None,
) -> dict:
    """Train ``student`` towards ``teacher`` on ``windows`` ([n, seq_len]); logs and checkpoints in ``out``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed)
    if cfg.train == "lora":
        student = with_lora(student, adapter.lora_targets(), cfg.lora_rank)
    params = select_trainable(student, cfg.train, plan, adapter, cfg.modules_also())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    loader = DataLoader(TensorDataset(windows[order]), batch_size=cfg.batch_size, shuffle=False, drop_last=True)
    steps = max(1, len(loader) // cfg.grad_accum)
    warm = max(1, int(cfg.warmup * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    student, optimizer, loader, scheduler = accelerator.prepare(student, optimizer, loader, scheduler)
    teacher.to(accelerator.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    ckpt_root = out / "checkpoints"
    step, start_batches = 0, 0
    if resume:
        last = _latest_checkpoint(ckpt_root)
        if last is None:
            raise KvxError(f"--resume: no complete checkpoint under {ckpt_root}")
        accelerator.load_state(str(last))
        step = json.loads((last / "trainer_state.json").read_text())["step"]
        start_batches = step * cfg.grad_accum
        if accelerator.is_main_process:
            note(f"continuing {out} from its checkpoint at step {step}")
    batches = accelerator.skip_first_batches(loader, start_batches) if start_batches else loader

    metrics_path = out / "metrics.jsonl"
    hidden = cfg.loss == "kl+hidden"
    advance = progress("distilling", steps) if progress else (lambda n, info=None: None)
    advance(step)
    t0, tokens_since, last_ppl = time.perf_counter(), 0, None
    student.train()
    for (ids,) in batches:
        with accelerator.accumulate(student):
            with torch.no_grad():
                t_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            s_out = student(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            loss, parts = distill_loss(cfg.loss, s_out, t_out, ids, cfg.temperature)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        tokens_since += ids.numel() * accelerator.num_processes
        if not accelerator.sync_gradients:
            continue
        step += 1
        mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()  # over processes
        record = {"step": step, "loss": mean_loss, **parts, "lr": scheduler.get_last_lr()[0]}
        record["tokens"] = step * cfg.batch_size * cfg.grad_accum * cfg.seq_len * accelerator.num_processes
        record["tokens_per_s"] = tokens_since / max(time.perf_counter() - t0, 1e-9)
        if cfg.eval_every and step % cfg.eval_every == 0 and eval_windows:
            student.eval()
            for n, (text, w) in enumerate(eval_windows.items()):  # eval_ppl: the first text; eval_ppl_<text>: each
                ppl = perplexity(accelerator.unwrap_model(student), w.to(accelerator.device))
                record[f"eval_ppl_{text}"] = ppl
                if n == 0:
                    last_ppl = record["eval_ppl"] = ppl
            student.train()
        if accelerator.is_main_process:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if cfg.save_every and step % cfg.save_every == 0:
            _save_state(accelerator, ckpt_root, step, cfg)
        ppl = f" | eval ppl {last_ppl:.2f}" if last_ppl is not None else ""
        advance(1, info=f"loss {record['loss']:.4f} | {record['tokens_per_s']:.0f} tok/s{ppl}")
    student.eval()
    trained = accelerator.unwrap_model(student)
    if hasattr(trained, "merge_and_unload"):  # LoRA: fold the adapters into the weights
        trained = trained.merge_and_unload()
    return {"steps": step, "accelerator": accelerator, "student": trained}


def _save_state(accelerator, root: Path, step: int, cfg: DistillConfig) -> None:
    """An accelerate state at ``root/step-N``, complete or absent (written aside, then renamed)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    if accelerator.is_main_process:  # a killed run's half-written states (the output lock says none is ours)
        for stale in root.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "config": asdict(cfg)}))
        pause_point("distill-checkpoint")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()


__all__ = ["converted_parameter_names", "run_distill", "select_trainable"]
