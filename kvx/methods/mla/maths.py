"""MLA upcycling as a pure weight transform: one layer's K/V weights (+ statistics) in, MLA weights out.

Order of operations (see METHODS.md, MLA section):
1. choose the RoPE frequency pairs each KV head keeps (2-norm score, or a fixed rule);
2. the kept dims become ``k_rope_proj``; the rest of K (NoPE) and all of V are factored
   jointly into ``kv_a_proj`` (down to the latent) and ``kv_b_proj`` (up), after scaling
   K so that K and V carry comparable energy (TransMLA's BKV balancing);
3. activation-aware: the factorisation is the PCA of the real ``[K_nope; V]`` outputs
   under the calibration input covariance; weights-only: the SVD of the weights (the same
   computation with an identity covariance).
At full rank the factorisation is exact, so the converted layer equals the original.

The ``shared`` layout (``convert_layer_to_shared_mla``) caches one RoPE key for all heads;
``deepseek`` adds an RMS norm on the latent, which makes it DeepSeek-V3's own attention, so
that a converted model exports to ``DeepseekV3ForCausalLM`` as a lossless re-layout. The shared key follows
TransMLA's RoRoPE: for each kept frequency, the principal direction of the keys across KV
heads carries RoPE; what the other directions held stays in the key as NoPE (compressed
with V), so with a single KV head at full rank the layer is still exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...calibration import LayerStats
from ...errors import KvxError

ROPE_SELECTIONS = ("2norm", "high", "low", "uniform")
LAYOUTS = ("kvx", "shared", "deepseek")  # shared: one RoPE key for all heads; deepseek: + latent norm
SHARED_ROPE_SELECTIONS = ("high", "uniform")  # frequency sets DeepSeek's RoPE can reproduce


@dataclass
class MLAWeights:
    kv_a: torch.Tensor  # [r, hidden]
    kv_b: torch.Tensor  # [n_kv*(nope + hd), r]
    kv_b_bias: torch.Tensor | None
    k_rope: torch.Tensor  # [n_kv*2m, hidden]
    k_rope_bias: torch.Tensor | None
    rope_pairs: torch.Tensor  # [n_kv, m] long ([1, m] with a shared key)
    energy_kept: float  # share of [K_nope; V] output energy the latent keeps (calibration or weights)
    rope_mix: torch.Tensor | None = None  # shared key: [n_kv, m] weight of each KV head in the shared key
    latent_scale: float | None = None  # deepseek layout: the latent norm's initial gain (typical latent RMS)
    rope_energy_kept: float | None = None  # shared key: share of kept-pair key energy the shared key carries


def full_rank(n_kv: int, head_dim: int, rope_dims: int, hidden: int, layout: str = "kvx") -> int:
    """The latent width at which the factorisation is exact for these dims."""
    if layout != "kvx":  # K keeps every dim as NoPE (the shared key only carries a copy's RoPE part)
        return min(n_kv * 2 * head_dim, hidden)
    return min(n_kv * (2 * head_dim) - rope_dims, hidden)


def validate_rope_dims(rope_dims: int, n_kv: int, head_dim: int, layout: str = "kvx") -> None:
    """RoPE dims come in whole frequency pairs per KV head (one shared key: whole pairs), at most all of them."""
    if layout not in LAYOUTS:
        raise KvxError(f"unknown MLA layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    if layout != "kvx":
        if rope_dims < 2 or rope_dims % 2 or rope_dims > head_dim:
            raise KvxError(
                f"--rope-dims {rope_dims}: the {layout} layout's shared RoPE key needs an even size from 2 to "
                f"head_dim = {head_dim}"
            )
        return
    if rope_dims < 0 or rope_dims % (2 * n_kv):
        raise KvxError(
            f"--rope-dims {rope_dims} must be a multiple of 2 x {n_kv} KV heads = {2 * n_kv} "
            "(each KV head keeps whole frequency pairs)"
        )
    if rope_dims > n_kv * head_dim:
        raise KvxError(
            f"--rope-dims {rope_dims} exceeds all RoPE dims ({n_kv} KV heads x {head_dim} = {n_kv * head_dim})"
        )


def validate_mla_dims(kv_rank: int, rope_dims: int, n_kv: int, head_dim: int, hidden: int, layout: str = "kvx") -> None:
    """Refuse sizes that cannot be honoured exactly, with the reason in one line."""
    validate_rope_dims(rope_dims, n_kv, head_dim, layout)
    full = full_rank(n_kv, head_dim, rope_dims, hidden, layout)
    if kv_rank < 1 or kv_rank > full:
        raise KvxError(f"--kv-rank {kv_rank} is out of range: it must be between 1 and {full} (full rank here)")


def select_pairs(method: str, n_kv: int, head_dim: int, m: int, pair_score: torch.Tensor | None = None) -> torch.Tensor:
    """Which ``m`` frequency pairs each KV head keeps, sorted, as ``[n_kv, m]``.

    Pair ``p`` pairs dims ``p`` and ``p + head_dim/2`` and rotates with the ``p``-th
    frequency; frequencies fall with ``p``, so ``high`` keeps the first pairs.
    """
    half = head_dim // 2
    if method == "2norm":
        if pair_score is None:
            raise KvxError("--rope-select 2norm needs calibration data (use --calib, or another --rope-select)")
        idx = pair_score.topk(m, dim=-1).indices if m else torch.zeros(n_kv, 0, dtype=torch.long)
        return idx.sort(dim=-1).values.long()
    if method == "high":
        one = torch.arange(m)
    elif method == "low":
        one = torch.arange(half - m, half)
    elif method == "uniform":
        one = torch.linspace(0, half - 1, m).round().long() if m else torch.zeros(0, dtype=torch.long)
        if one.unique().numel() != m:
            raise KvxError(f"uniform selection of {m} pairs out of {half} is ambiguous")
    else:
        raise KvxError(f"unknown --rope-select {method!r} (choose from {', '.join(ROPE_SELECTIONS)})")
    return one.long().expand(n_kv, m).clone()


def _split_k(wk: torch.Tensor, n_kv: int, head_dim: int, pairs: torch.Tensor):
    """Rows of K per head -> (RoPE rows [n_kv*2m, ...] in x1|x2 order, NoPE rows, NoPE row index)."""
    half = head_dim // 2
    rope_rows, nope_rows = [], []
    for g in range(n_kv):
        base = g * head_dim
        sel = torch.cat([pairs[g], pairs[g] + half])
        keep = torch.ones(head_dim, dtype=torch.bool)
        keep[sel] = False
        rope_rows.append(base + sel)
        nope_rows.append(base + keep.nonzero()[:, 0])
    return torch.cat(rope_rows), torch.cat(nope_rows)


def output_spectrum(m: torch.Tensor, cov: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors of the outputs ``m x`` under input covariance ``cov``
    (identity when None): the energy spectrum a rank cut of ``m`` keeps or loses."""
    m64 = m.double()
    out_cov = m64 @ m64.T if cov is None else m64 @ cov.double() @ m64.T
    evals, evecs = torch.linalg.eigh(out_cov)
    order = evals.argsort(descending=True)
    return evals[order].clamp_min(0), evecs[:, order]


def joint_lowrank(m: torch.Tensor, cov: torch.Tensor | None, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factor ``m`` [rows, hidden] as ``up @ down`` with ``down`` of ``rank`` rows.

    ``up`` is the top principal directions of the outputs ``m x`` under input covariance
    ``cov`` (identity: weights-only SVD). Returns (up, down, kept energy share).
    """
    evals, evecs = output_spectrum(m, cov)
    u = evecs[:, :rank]
    kept = float(evals[:rank].sum() / evals.sum().clamp_min(1e-30))
    return u, u.T @ m.double(), kept


@dataclass
class JointKV:
    """The matrix MLA factors: balanced ``[alpha * K_nope; V]`` rows, and where K's rows went."""

    joint: torch.Tensor  # [n_kv*(hd - 2m) + n_kv*hd, hidden], float64
    alpha: float  # K_nope scale that balanced K and V energy
    wk: torch.Tensor  # K rows with the key norm's gain folded in
    bk: torch.Tensor | None
    rope_rows: torch.Tensor
    nope_rows: torch.Tensor


def joint_kv(
    wk: torch.Tensor,
    wv: torch.Tensor,
    bk: torch.Tensor | None,
    *,
    n_kv: int,
    head_dim: int,
    pairs: torch.Tensor,
    cov: torch.Tensor | None,
    k_gain: torch.Tensor | None = None,
) -> JointKV:
    """Split K into kept-RoPE and NoPE rows and stack NoPE K (scaled to V's energy) over V."""
    wk, bk = wk.double(), None if bk is None else bk.double()
    if k_gain is not None:  # (w * (W x + b)) * s == ((w W) x + w b) * s: the norm's gain is linear
        gain = k_gain.double().repeat(n_kv)
        wk = wk * gain[:, None]
        bk = None if bk is None else bk * gain
    rope_rows, nope_rows = _split_k(wk, n_kv, head_dim, pairs)
    wk_nope, wv = wk[nope_rows], wv.double()

    def energy(w):
        return float((w @ cov.double() * w).sum()) if cov is not None else float((w * w).sum())

    e_k, e_v = energy(wk_nope), energy(wv)
    alpha = (e_v / e_k) ** 0.5 if e_k > 0 and e_v > 0 else 1.0
    return JointKV(torch.cat([wk_nope * alpha, wv]), alpha, wk, bk, rope_rows, nope_rows)


@dataclass(frozen=True)
class OutputWeighting:
    """What the attention output sees of K and V: per KV head, the second moment of its queries
    (a key error ``e`` moves a score by ``q . e``) and ``sum_h W_o,h^T W_o,h`` over its query
    heads (a value error reaches the output through ``o_proj``). ``beta`` scales the key part
    against the value part after both are balanced to equal weighted energy."""

    query_cov: torch.Tensor  # [n_kv, hd, hd]
    o_proj: torch.Tensor  # [hidden, n_heads * hd]
    beta: float = 1.0


def _sqrtm(m: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """Symmetric square root of a PSD matrix, eigenvalues floored (relative) so it stays invertible."""
    if m.numel() == 0:  # a KV head that keeps every dim with RoPE has no NoPE key rows
        return m.double()
    evals, evecs = torch.linalg.eigh(m.double())
    evals = evals.clamp_min(float(evals.max().clamp_min(1e-30)) * floor)
    return (evecs * evals.sqrt()) @ evecs.T


def output_row_weight(jkv: JointKV, weighting: OutputWeighting, n_kv: int, head_dim: int, cov) -> torch.Tensor:
    """The block-diagonal row weight ``M`` of ``[K_nope; V]`` whose weighted factorisation
    minimises the attention-output-facing error (queries on keys, ``o_proj`` on values)."""
    n_heads = weighting.o_proj.shape[1] // head_dim
    group = n_heads // n_kv
    nope = jkv.nope_rows
    blocks = []
    for g in range(n_kv):  # key rows of KV head g: its NoPE dims
        dims = nope[(nope // head_dim) == g] % head_dim
        blocks.append(_sqrtm(weighting.query_cov[g].double()[dims][:, dims]))
    wo = weighting.o_proj.double().view(-1, n_heads, head_dim)
    for g in range(n_kv):  # value rows of KV head g
        heads = wo[:, g * group : (g + 1) * group]
        blocks.append(_sqrtm(torch.einsum("ohd,ohe->de", heads, heads)))
    m = torch.block_diag(*blocks)
    n_k = nope.numel()
    raw = _raw_joint(jkv)
    c = cov.double() if cov is not None else None

    def energy(rows):
        w = m[rows][:, rows] @ raw[rows]
        return float((w @ c * w).sum()) if c is not None else float((w * w).sum())

    e_k, e_v = energy(slice(0, n_k)), energy(slice(n_k, None))
    scale = weighting.beta * ((e_v / e_k) ** 0.5 if e_k > 0 and e_v > 0 else 1.0)
    m[:n_k] *= scale
    return m


def _raw_joint(jkv: JointKV) -> torch.Tensor:
    """``[K_nope; V]`` without the balancing scale."""
    raw = jkv.joint.clone()
    raw[: jkv.nope_rows.numel()] /= jkv.alpha
    return raw


def _factor(
    jkv: JointKV,
    bv: torch.Tensor | None,
    cov: torch.Tensor | None,
    kv_rank: int,
    exact: bool,
    kv_rows: int,
    row_weight: torch.Tensor | None = None,
):
    """Factor ``jkv`` to ``kv_rank`` (exactly: by the weights; else under ``cov``), undo the row
    weighting in the up-projection (K's balancing scale, or an output-aware ``row_weight``), and
    line up the ``kv_b`` bias ([K_nope; V]; ``kv_rows`` per part).
    Returns (down, up, bias or None, kept energy share), float64."""
    if row_weight is None:
        up, down, kept = joint_lowrank(jkv.joint, None if exact else cov, kv_rank)
        up = up.clone()
        up[: jkv.nope_rows.numel()] /= jkv.alpha
    else:  # minimise ||M (J - U D) x||: PCA of the weighted outputs, then U = M^-1 P, D = P^T M J
        up, down, kept = joint_lowrank(row_weight @ _raw_joint(jkv), None if exact else cov, kv_rank)
        up = torch.linalg.solve(row_weight, up)
    bias = None
    if jkv.bk is not None or bv is not None:
        zeros = torch.zeros(kv_rows, dtype=torch.float64)
        bk = jkv.bk if jkv.bk is not None else zeros
        bias = torch.cat([bk[jkv.nope_rows], bv.double() if bv is not None else zeros])
    return down, up, bias, kept


def convert_layer_to_mla(
    wk: torch.Tensor,
    wv: torch.Tensor,
    bk: torch.Tensor | None,
    bv: torch.Tensor | None,
    *,
    n_kv: int,
    head_dim: int,
    kv_rank: int,
    rope_dims: int,
    rope_select: str,
    stats: LayerStats | None,
    k_gain: torch.Tensor | None = None,
    weighting: OutputWeighting | None = None,
) -> MLAWeights:
    """One layer's MLA weights. ``k_gain``: effective per-dim gain of a per-head key norm (folded in).

    With ``stats`` the factorisation is activation-aware; without, weights-only. ``weighting``:
    weigh K/V errors by what the attention output sees of them (else: K and V balanced by energy).
    """
    hidden = wk.shape[1]
    validate_mla_dims(kv_rank, rope_dims, n_kv, head_dim, hidden)
    m = rope_dims // (2 * n_kv)
    pairs = select_pairs(rope_select, n_kv, head_dim, m, stats.pair_score if stats is not None else None)
    cov = stats.covariance if stats is not None else None
    jkv = joint_kv(wk, wv, bk, n_kv=n_kv, head_dim=head_dim, pairs=pairs, cov=cov, k_gain=k_gain)
    exact = kv_rank == full_rank(n_kv, head_dim, rope_dims, hidden)
    row_weight = None if weighting is None else output_row_weight(jkv, weighting, n_kv, head_dim, cov)
    down, up, bias, kept = _factor(jkv, bv, cov, kv_rank, exact, n_kv * head_dim, row_weight)
    return MLAWeights(
        kv_a=down.float(),
        kv_b=up.float(),
        kv_b_bias=None if bias is None else bias.float(),
        k_rope=jkv.wk[jkv.rope_rows].float(),
        k_rope_bias=None if jkv.bk is None else jkv.bk[jkv.rope_rows].float(),
        rope_pairs=pairs,
        energy_kept=kept,
    )


def shared_pairs(method: str, head_dim: int, m: int) -> torch.Tensor:
    """The ``m`` pairs a shared RoPE key keeps: a progression from pair 0 (``high``: stride 1,
    ``uniform``: the widest stride that fits), because DeepSeek's RoPE can only reproduce
    frequencies ``theta^(-2 s j / head_dim)``, j = 0..m-1 (as its own ``rope_theta``)."""
    if method not in SHARED_ROPE_SELECTIONS:
        raise KvxError(
            f"--rope-select {method!r} cannot feed one shared RoPE key: choose {' or '.join(SHARED_ROPE_SELECTIONS)}"
        )
    stride = 1 if method == "high" else (head_dim // 2) // m
    return (torch.arange(m) * stride)[None].long()


def _principal_across_heads(rows: torch.Tensor, cov: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """``rows`` [n_kv, 2, hidden]: one frequency pair's two key rows per KV head. The unit
    direction across heads holding most of that pair's key energy (rotation-invariant, so
    any position gives the same answer), and its share of the energy."""
    flat = rows.double()
    c = cov.double() if cov is not None else None
    gram = sum((w @ c @ w.T) if c is not None else (w @ w.T) for w in flat.unbind(1))  # [n_kv, n_kv]
    evals, evecs = torch.linalg.eigh(gram)
    u = evecs[:, -1]
    u = u * (1.0 if float(u.sum()) >= 0 else -1.0)  # a fixed sign: reproducible checkpoints
    return u, float(evals[-1] / evals.sum().clamp_min(1e-30))


def convert_layer_to_shared_mla(
    wk: torch.Tensor,
    wv: torch.Tensor,
    bk: torch.Tensor | None,
    bv: torch.Tensor | None,
    *,
    n_kv: int,
    head_dim: int,
    kv_rank: int,
    rope_dims: int,
    rope_select: str,
    stats: LayerStats | None,
    latent_norm: bool = False,
    weighting: OutputWeighting | None = None,
) -> MLAWeights:
    """One layer in the shared / deepseek layout: one RoPE key of ``rope_dims`` shared by all heads.

    For each kept pair, the key rows of all KV heads are projected on their principal
    direction ``u`` (the shared RoPE key is ``u^T K``; a query head of KV head ``g`` reads it
    with weight ``u[g]``) and the remainder ``(I - u u^T) K`` stays in K as NoPE. NoPE K and V
    are then factored into the latent exactly as in the kvx layout. ``latent_norm``: the
    latent will be RMS-normalised (deepseek layout); its gain starts at the latent's typical
    RMS under calibration, so normalised latents keep their average size.
    """
    hidden = wk.shape[1]
    validate_mla_dims(kv_rank, rope_dims, n_kv, head_dim, hidden, "shared")
    m, half = rope_dims // 2, head_dim // 2
    pairs = shared_pairs(rope_select, head_dim, m)
    cov = stats.covariance if stats is not None else None
    wk3 = wk.double().view(n_kv, head_dim, hidden).clone()
    bk2 = None if bk is None else bk.double().view(n_kv, head_dim).clone()
    mix, shares = torch.zeros(n_kv, m, dtype=torch.float64), []
    rope_rows, rope_bias = torch.zeros(2, m, hidden, dtype=torch.float64), torch.zeros(2, m, dtype=torch.float64)
    for j, p in enumerate(pairs[0].tolist()):
        dims = [p, p + half]
        u, share = _principal_across_heads(wk3[:, dims], cov)
        mix[:, j] = u
        shares.append(share)
        shared = torch.einsum("g,gch->ch", u, wk3[:, dims])  # [2, hidden]
        rope_rows[:, j] = shared
        wk3[:, dims] -= u[:, None, None] * shared[None]
        if bk2 is not None:
            shared_b = u @ bk2[:, dims]
            rope_bias[:, j] = shared_b
            bk2[:, dims] -= u[:, None] * shared_b[None]

    jkv = joint_kv(
        wk3.reshape(n_kv * head_dim, hidden),
        wv,
        None if bk2 is None else bk2.flatten(),
        n_kv=n_kv,
        head_dim=head_dim,
        pairs=torch.zeros(n_kv, 0, dtype=torch.long),
        cov=cov,
    )
    exact = kv_rank == full_rank(n_kv, head_dim, rope_dims, hidden, "shared")
    row_weight = None if weighting is None else output_row_weight(jkv, weighting, n_kv, head_dim, cov)
    down, up, bias, kept = _factor(jkv, bv, cov, kv_rank, exact, n_kv * head_dim, row_weight)
    latent_ms = float(torch.einsum("rh,hk,rk->", down, cov.double(), down) / kv_rank) if cov is not None else 1.0
    return MLAWeights(
        kv_a=down.float(),
        kv_b=up.float(),
        kv_b_bias=None if bias is None else bias.float(),
        k_rope=rope_rows.reshape(2 * m, hidden).float(),  # x1 rows then x2 rows
        k_rope_bias=None if bk is None else rope_bias.flatten().float(),
        rope_pairs=pairs,
        energy_kept=kept,
        rope_mix=mix.float(),
        latent_scale=max(latent_ms, 1e-12) ** 0.5 if latent_norm else None,
        rope_energy_kept=sum(shares) / len(shares),
    )
