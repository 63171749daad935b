"""``evict``: a cache that holds a fixed budget of tokens and evicts the rest, block by block.

AttentionPredictor ("AttentionPredictor: Temporal Pattern Matters for Efficient LLM
Inference", Yang et al. 2025) keeps sink and local tokens and fills the rest of a token
budget with the blocks of 16 keys it predicts the next step will attend to. Its baselines,
at the same budget, are policies here: StreamingLLM (``recent``), H2O (``h2o``, attention
received), SnapKV (``snapkv``, attention of the prompt's last queries) and the previous step's
attention (``previous``). Unlike the published code, the eviction is real: the cache holds
``budget`` tokens and attention runs over those only. Weights are the base layer's own.
"""

from __future__ import annotations

from ..errors import KvxError
from ..modeling.kvx_evict import PREDICTOR, initial_predictor
from ..modeling.kvx_specs import POLICIES, EvictSpec
from ..progress import no_progress
from .base import LayerInput, Method, Option

TARGETS = 128  # next-step rows recorded per calibration window and layer, at most a quarter of it
PREDICTOR_STEPS = 300  # the predictor's training steps unless --predictor-steps says otherwise


class EvictMethod(Method):
    kind = "evict"
    spec_type = EvictSpec
    options = {
        "budget": Option(int, "evict: tokens each layer's cache holds (sinks + local + chosen blocks)."),
        "policy": Option(str, f"evict: how blocks are kept: {', '.join(POLICIES)}."),
    }
    conversion_options = {
        "predictor_steps": Option(
            int, f"evict: training steps of the block predictor (policy predictor; {PREDICTOR_STEPS})."
        ),
    }
    tags = ("kv-eviction", "attention-sinks")

    def check(self, spec: EvictSpec, adapter, layer: int) -> None:
        where = f"layer {layer}: evict"
        if spec.policy not in POLICIES:
            raise KvxError(f"{where} policy {spec.policy!r} is unknown (known: {', '.join(POLICIES)})")
        if min(spec.block, spec.local, spec.observe) < 1 or spec.sink < 0 or spec.history < 3 or spec.refresh < 0:
            raise KvxError(f"{where} needs block >= 1, sink >= 0, local >= 1, observe >= 1, history >= 3, refresh >= 0")
        odd = [f"{n}={getattr(spec, n)}" for n in ("budget", "sink", "local") if getattr(spec, n) % spec.block]
        if odd:
            raise KvxError(f"{where}: {', '.join(odd)} not a multiple of the block size {spec.block}")
        if spec.budget < spec.sink + spec.local + spec.block:
            raise KvxError(
                f"{where} budget {spec.budget} leaves no room for a chosen block: it must be at least "
                f"sink + local + block = {spec.sink + spec.local + spec.block}"
            )
        local = adapter.sliding_window(layer)
        if local is not None:
            raise KvxError(f"layer {layer} already attends to a local window of {local}: it cannot evict")

    def check_plan(self, plan, adapter) -> None:
        shapes = {(s.sink, s.block, s.history) for s in _predicted(plan)}
        if len(shapes) > 1:
            raise KvxError(
                "the predictor policy's layers share one predictor: give them the same sink, block and history "
                f"(got {sorted(shapes)} as (sink, block, history))"
            )

    def needs(self, spec: EvictSpec, calibrated: bool, options: dict | None = None) -> frozenset[str]:
        steps = (options or {}).get("predictor_steps", PREDICTOR_STEPS)
        if not isinstance(steps, int) or steps < 1:
            raise KvxError(f"evict: predictor_steps must be a whole number >= 1 (got {steps!r})")
        if spec.policy != "predictor":
            return frozenset()
        if not calibrated:
            raise KvxError("evict policy predictor is trained on calibration text: give --calib (not none)")
        return frozenset({"calibration"})

    def observe(self, spec: EvictSpec, layer: LayerInput, attn, xs, kwargs, store) -> None:
        """Each window's attention traces (``evict_train.trace_rows``); the last window of the
        last batch is held out, to judge the predictor against the rules."""
        from .evict_train import trace_rows

        if spec.policy != "predictor":
            return
        for b, (x, kw) in enumerate(zip(xs, kwargs)):
            q, k, _ = layer.adapter.qkv(attn, x, *kw["position_embeddings"])
            rows = trace_rows(q, k, float(attn.scaling), spec, min(TARGETS, x.shape[1] // 4))
            if rows is None:
                continue
            seen, mass = rows
            held = b == len(xs) - 1 and (x.shape[0] > 1 or len(xs) > 1)
            n_held = seen.shape[0] // x.shape[0] if held else 0  # one window's KV heads
            store.setdefault("held", []).append((seen[seen.shape[0] - n_held :], mass[mass.shape[0] - n_held :]))
            store.setdefault("train", []).append((seen[: seen.shape[0] - n_held], mass[: mass.shape[0] - n_held]))

    def model_state(self, plan, store, options, progress=no_progress) -> tuple[dict, dict]:
        """The shared predictor: trained on the recorded traces, or (in-memory conversion, no
        text) its seeded initialisation, so that a model always loads the same predictor."""
        from .evict_train import fit_on_traces

        users = _predicted(plan)
        if not users:
            return {}, {}
        if store is None:
            model, info = initial_predictor(users[0].history), {}
        else:
            keep = lambda pairs: [p for p in pairs if p[0].shape[0]]  # noqa: E731
            steps = options.get("predictor_steps", PREDICTOR_STEPS)
            bar = progress("training the block predictor", steps)
            model, report = fit_on_traces(
                keep(store.get("train", [])), keep(store.get("held", [])), users[0], steps, bar
            )
            info = {"predictor": report}
        return {f"{PREDICTOR}.{k}": v.detach().clone() for k, v in model.state_dict().items()}, info


def _predicted(plan) -> list[EvictSpec]:
    return [s for s in plan.layers if s.kind == "evict" and s.policy == "predictor"]
