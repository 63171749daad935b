"""Distillation losses: the student learns the teacher's next-token distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("kl", "kl+ce", "kl+hidden")


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(teacher || student) per token, averaged, scaled by T^2 so gradients keep their size."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(s.flatten(0, -2), p.flatten(0, -2), log_target=True, reduction="batchmean") * t * t


def distill_loss(
    kind: str, student_out, teacher_out, input_ids: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, dict]:
    """The training loss for ``kind`` and its parts (for the log)."""
    kl = kl_loss(student_out.logits[:, :-1], teacher_out.logits[:, :-1], temperature)
    parts = {"kl": kl.item()}
    loss = kl
    if kind == "kl+ce":
        ce = F.cross_entropy(student_out.logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten())
        parts["ce"] = ce.item()
        loss = loss + ce
    elif kind == "kl+hidden":
        mse = sum(
            F.mse_loss(s.float(), t.float())
            for s, t in zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:])
        )
        mse = mse / (len(student_out.hidden_states) - 1)
        parts["hidden_mse"] = mse.item()
        loss = loss + mse
    return loss, parts
