"""``kvx distill``'s config: teacher, data, budget, optimisation, what trains."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import also_trainable, opt
from ..errors import KvxError
from ..generate import mix_parts
from .losses import LOSSES

TRAIN_MODES = ("converted", "all", "lora")


@dataclass(frozen=True)
class DistillConfig:
    teacher: str | None = opt(None, "Teacher (default: the model STUDENT was converted from); same tokenizer.")
    data: str = opt(
        "teacher+bundled",
        "Training text: 'bundled', a file/folder, hf:NAME, 'teacher' (text the teacher writes), or a mix such as "
        "the default 'teacher+bundled' (tokens shared equally; it generalised best in benchmarks/healing.py).",
    )
    tokens: int = opt(262_144, "Training tokens.")
    seq_len: int = opt(256, "Sequence length.")
    batch_size: int = opt(4, "Sequences per batch (per process).")
    grad_accum: int = opt(1, "Batches per optimizer step.")
    lr: float = opt(1e-4, "Peak learning rate (linear warm-up, linear decay).")
    warmup: float = opt(0.05, "Share of the steps spent warming the learning rate up.")
    temperature: float = opt(1.0, "Softmax temperature of the KL.")
    loss: str = opt("kl", "kl | kl+ce | kl+hidden.")
    train: str = opt("converted", "converted (only weights the conversion created) | all | lora.")
    train_also: str = opt(
        "none",
        "With --train converted or lora: original projections of each converted layer that train too, "
        "comma-separated (q_proj, o_proj, as the conversion's --fit-also); 'none' for the converted weights alone.",
    )
    eval_every: int = opt(0, "Evaluation perplexity every K steps (0: only at the end).")
    eval_tokens: int = opt(4096, "Tokens of each evaluation text's windows.")
    eval_data: str = opt(
        "auto",
        "Evaluation texts, comma-separated ('auto': the training data's eval parts, bundled for --data teacher, "
        "then wiki, a text of another domain never trained on).",
    )

    def eval_texts(self) -> list[str]:
        if self.eval_data != "auto":
            return [t.strip() for t in self.eval_data.split(",") if t.strip()]
        sources = [p for p in mix_parts(self.data) if p != "teacher"] or ["bundled"]
        return list(dict.fromkeys(sources + ["wiki"]))

    save_every: int = opt(0, "Resumable checkpoint every K steps (0: none).")
    mixed_precision: str = opt("no", "no | bf16 | fp16 (accelerate).")
    lora_rank: int = opt(8, "LoRA rank for --train lora.")
    seed: int = opt(0, "Seed of the data order and sampling.")

    def modules_also(self) -> tuple[str, ...]:
        return also_trainable(self.train_also, "--train-also")

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise KvxError(f"unknown --loss {self.loss!r} (choose from {', '.join(LOSSES)})")
        if self.train not in TRAIN_MODES:
            raise KvxError(f"unknown --train {self.train!r} (choose from {', '.join(TRAIN_MODES)})")
        if self.modules_also() and self.train == "all":
            raise KvxError(
                "--train-also names projections to add to --train converted or lora; --train all trains them"
            )
        if self.lora_rank < 1:
            raise KvxError(f"--lora-rank {self.lora_rank} must be at least 1")
        if self.tokens < self.batch_size * self.seq_len * self.grad_accum:
            raise KvxError(
                f"--tokens {self.tokens} is less than one optimizer step "
                f"({self.batch_size} x {self.seq_len} tokens x {self.grad_accum} accumulation)"
            )
