#!/usr/bin/env bash
# Regenerates docs/demo/real_vs_fake.png from a fresh demo run, so the README's picture
# always comes from the current code. Run from the repository root:
#   bash docs/demo/make_figure.sh [WORKDIR]     (WORKDIR: runs/mnist by default)
# Training takes 2 to 4 minutes on 2 CPU cores.
set -euo pipefail

python=${PYTHON:-.venv/bin/python}
workdir=${1:-runs/mnist}

if [[ ! -f dcgan_jax/sample.py ]]; then
  echo "make_figure.sh: run it from the repository root" >&2
  exit 1
fi
if [[ -e "$workdir" ]]; then
  # Resuming an old run would draw a figure of whatever code trained it.
  echo "make_figure.sh: $workdir exists; remove it, or name another WORKDIR, to train afresh" >&2
  exit 1
fi

"$python" -m dcgan_jax.main --config=configs/mnist.py --workdir="$workdir"
"$python" -m dcgan_jax.sample real_vs_fake --workdir="$workdir" --seed=0 --rows=8 \
  --out=docs/demo/real_vs_fake.png
