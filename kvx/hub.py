"""Model cards and pushing checkpoints to the Hub.

``push`` is two steps so the network part stays small and the rest is testable offline:
``upload_plan`` reads the folder and decides everything (repo, branch, files, the final model
card, the commit message); ``execute`` hands that plan to ``huggingface_hub`` as
``create_repo`` + ``create_branch`` + one ``create_commit`` (so a push is all or nothing).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from .arch.deepseek import is_native_mla, native_mla_plan
from .errors import KvxError
from .plan import Plan

SKIPPED = ("checkpoints/", ".")  # resumable training states and hidden temp folders stay local
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def plan_tags(plan: Plan) -> list[str]:
    """Hub tags: kvx's own, then each method's for the kinds the plan uses."""
    from .methods import method_of

    tags = ["kvx", "kv-cache-compression"] + [t for spec in plan.layers for t in method_of(spec).tags]
    return list(dict.fromkeys(tags))


def model_card(base_model: str, plan: Plan, kv: dict, extra: dict | None = None) -> str:
    """A README.md for a converted checkpoint: what it is, its plan, its measured cache size."""
    extra = extra or {}
    if kv["measured"] <= 0 or kv["measured"] != kv["spec"]:
        raise KvxError(
            f"refusing to write a model card: the cache measured {kv['measured']:.0f} bytes/token, the plan says "
            f"{kv['spec']:.0f}"
        )
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: transformers",
        f"tags: [{', '.join(plan_tags(plan))}]",
        "---",
        "",
        f"# {base_model}, converted by kvx",
        "",
        f"Base model: `{base_model}`. Plan: {plan.summary()}.",
        "",
        "| KV cache | bytes/token |",
        "| --- | --- |",
        f"| base model | {kv['baseline']:.0f} |",
        f"| this model (measured from the cache object) | {kv['measured']:.0f} |",
        f"| this model (from the plan) | {kv['spec']:.0f} |",
        f"| ratio | {kv['baseline'] / kv['measured']:.2f}x |",
        "",
        f"Measured after a forward of {kv['tokens']} tokens at {kv['dtype']}.",
        "",
    ]
    for key, value in extra.items():
        lines.append(f"- {key}: {value}")
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)',
        "```",
        "",
        "The modeling code ships in this folder (`modeling_kvx.py` and its `kvx_*.py` siblings, torch +",
        "transformers only). The config's `model_type` is `kvx`, so without `trust_remote_code=True`",
        "transformers refuses to load it instead of building the plain base model.",
        "",
        "## Plan",
        "",
        "```yaml",
        plan.to_yaml().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def deepseek_card(source: str, plan: Plan, config) -> str:
    """README.md of a DeepSeek-V3 export: where it came from, its shape, how to load and serve it."""
    return "\n".join(
        [
            "---",
            f"base_model: {plan.base_model}",
            "library_name: transformers",
            "tags: [kvx, mla, deepseek_v3, kv-cache-compression]",
            "---",
            "",
            f"# {plan.base_model}, converted to DeepSeek-V3 multi-head latent attention by kvx",
            "",
            f"Exported from the kvx checkpoint `{source}` ({plan.summary()}). Same function, DeepSeek-V3 layout:",
            f"latent `kv_lora_rank={config.kv_lora_rank}`, one shared RoPE key "
            f"`qk_rope_head_dim={config.qk_rope_head_dim}`",
            f"(interleaved, `rope_theta={config.rope_parameters['rope_theta']:.6g}`), dense MLP in every layer",
            f"(`first_k_dense_replace={config.first_k_dense_replace}`), no q LoRA. Per token and layer the cache holds",
            f"{config.kv_lora_rank + config.qk_rope_head_dim} floats.",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            'model = AutoModelForCausalLM.from_pretrained("PATH")  # DeepseekV3ForCausalLM, no remote code',
            "```",
            "",
            "MLA serving engines that read DeepSeek-V3 configs (vLLM, SGLang) load it as a DeepSeek-V3 model.",
            "",
        ]
    )


# --------------------------------------------------------------------------- push


@dataclass
class UploadPlan:
    """Everything a push will do, decided before any network call."""

    repo_id: str
    private: bool
    revision: str | None
    files: list[str]  # paths inside the folder, uploaded as they are
    card: str  # README.md, regenerated with metadata, eval table and distillation run
    commit_message: str
    folder: Path = field(repr=False, default=Path("."))


def _read_card(path: Path) -> tuple[dict, str]:
    """A README's metadata header (as a dict) and its body; empty when there is no README."""
    from huggingface_hub import ModelCard

    if not path.is_file():
        return {}, ""
    card = ModelCard(path.read_text())
    return card.data.to_dict(), card.text


def base_license(base_model: str | None) -> str | None:
    """The base model's licence: a built-in alias's, a local folder's README header, or (online) the Hub's."""
    from .loading import ALIASES

    if not base_model:
        return None
    for alias in ALIASES.values():
        if base_model == alias.hub_id:
            return alias.license
    readme = Path(base_model) / "README.md"
    if readme.is_file():
        return _read_card(readme)[0].get("license")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or base_model.count("/") != 1:
        return None
    try:
        from huggingface_hub import model_info

        info = model_info(base_model, timeout=10)
        return getattr(info.card_data, "license", None) if info.card_data else None
    except Exception:  # no network, gated or unknown model: the card simply has no licence
        return None


def _eval_section(folder: Path) -> list[str]:
    """The comparison table of a ``kvx run`` folder (``eval.json`` beside or above the checkpoint)."""
    for path in (folder / "eval.json", folder.parent / "eval.json"):
        if path.is_file():
            result = json.loads(path.read_text())
            rows = result.get("rows", {})
            if not rows:
                continue
            base = rows.get("original", next(iter(rows.values())))["kv_bytes_per_token"]
            lines = [
                "## Evaluation",
                "",
                f"Perplexity on {result.get('data', '?')} (`kvx eval`), same windows for every row.",
                "",
                "| model | perplexity | KV bytes/token | KV cut |",
                "| --- | --- | --- | --- |",
            ]
            for label, row in rows.items():
                lines.append(
                    f"| {label} | {row['ppl']:.3f} | {row['kv_bytes_per_token']:.0f} | "
                    f"{base / row['kv_bytes_per_token']:.2f}x |"
                )
            return lines + [""] + _judgement_section(rows)
    return []


def _judgement_section(rows: dict) -> list[str]:
    """Downstream task scores and generation agreement, where the eval measured them."""
    from .eval.report import agreement_table, markdown, task_table

    lines = []
    header, table = task_table(rows)
    if header:
        lines += ["Downstream tasks, zero-shot, through lm-eval-harness (± standard error):", ""]
        lines += markdown(header, table) + [""]
    header, table, _ = agreement_table(rows)
    if header:
        lines += [f"Greedy continuations against the {next(iter(rows))} model's, same prompts:", ""]
        lines += markdown(header, table) + [""]
    return lines


def _distill_section(folder: Path, config: dict) -> list[str]:
    run = (config.get("kvx") or {}).get("distillation")
    summary_path = folder / "distill_summary.json"
    if not run and not summary_path.is_file():
        return []
    lines = ["## Distillation", ""]
    if run:
        lines.append(
            f"{run['tokens']} tokens of {run['data']} from teacher `{run['teacher']}`, loss {run['loss']}, trained "
            f"{run['train']}."
        )
    if summary_path.is_file():
        s = json.loads(summary_path.read_text())
        if "ppl_after" in s:
            lines.append(
                f"Perplexity {s['ppl_before']:.3f} before, {s['ppl_after']:.3f} after (teacher "
                f"{s['ppl_teacher']:.3f}); "
                f"{s['steps']} steps in {s['seconds']:.0f} s."
            )
    return lines + [""]


def hub_card(folder: Path, repo_id: str | None = None) -> str:
    """The pushed README.md: the folder's own card with Hub metadata (ModelCardData), the eval table and the "
    "distillation run."""
    from huggingface_hub import ModelCard, ModelCardData

    config = json.loads((folder / "config.json").read_text())
    meta, body = _read_card(folder / "README.md")
    base = meta.get("base_model") or (config.get("kvx") or {}).get("base_model")
    plan = config.get("kvx")
    if is_native_mla(config):  # a DeepSeek-V3 export: its cache is a plan of MLA layers
        tags = plan_tags(native_mla_plan(SimpleNamespace(**config))) + [config["model_type"]]
    else:
        tags = plan_tags(Plan.from_dict(plan)) if plan else ["kvx", "kv-cache-compression"]
    data = ModelCardData(
        base_model=base,
        license=meta.get("license") or base_license(base),
        library_name="transformers",
        tags=list(dict.fromkeys(tags)),
        pipeline_tag="text-generation",
    )
    extra = _eval_section(folder) + _distill_section(folder, config)
    body = body.strip() + ("\n\n" + "\n".join(extra) if extra else "") + "\n"
    if repo_id:
        body = body.replace('from_pretrained("PATH"', f'from_pretrained("{repo_id}"')
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def upload_plan(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None) -> UploadPlan:
    """Check the folder and the repo id, and decide the files, card and commit message."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise KvxError(f"{folder} is not a checkpoint folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise KvxError(f"{folder} has no .safetensors weights")
    if not REPO_ID.match(repo_id):
        raise KvxError(f"--repo {repo_id!r} must look like USER/NAME")
    files = sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and not str(p.relative_to(folder)).startswith(SKIPPED) and p.name != "README.md"
    )
    config = json.loads((folder / "config.json").read_text())
    plan = Plan.from_dict(config["kvx"]).summary() if config.get("kvx") else config.get("model_type", "model")
    return UploadPlan(repo_id, private, revision, files, hub_card(folder, repo_id), f"kvx push: {plan}", folder)


def execute(plan: UploadPlan) -> str:
    """Create the repo (and branch) if needed and upload everything in one commit; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise KvxError("pushing needs the network, but HF_HUB_OFFLINE=1 is set")
    api = HfApi()
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(plan.folder / f)) for f in plan.files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=plan.card.encode()))
    try:
        api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
        if plan.revision:
            api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True)
        info = api.create_commit(plan.repo_id, operations, commit_message=plan.commit_message, revision=plan.revision)
    except LocalTokenNotFoundError:
        raise KvxError("not logged in to the Hub: run `hf auth login` or set HF_TOKEN") from None
    except HfHubHTTPError as e:
        raise KvxError(f"the Hub refused the push: {str(e).splitlines()[0]}") from None
    except Exception as e:
        if not _is_network_error(e):
            raise
        raise KvxError(
            f"could not reach the Hub ({type(e).__name__}: {e}): check the network, or HF_ENDPOINT"
        ) from None
    return getattr(info, "commit_url", str(info))


def _is_network_error(e: Exception) -> bool:
    """DNS failures, refused connections, timeouts: OSError, or the HTTP client's transport errors."""
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, OSError) or bool(names & {"TransportError", "ConnectionError", "TimeoutException", "Timeout"})


def push(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None, dry_run: bool = False):
    """``kvx push DIR --repo USER/NAME``: the commit URL, or with ``dry_run`` the plan without uploading."""
    plan = upload_plan(folder, repo_id, private, revision)
    return plan if dry_run else execute(plan)
