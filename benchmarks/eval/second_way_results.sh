#!/usr/bin/env bash
# The second way to learn (docs/results.md): a model trained on MNIST + the Omniglot atlas knowing only the dataset kind,
# then extended with label and with Omniglot's alphabet.
set -euo pipefail
# usage: benchmarks/eval/second_way_results.sh [WORKDIR]   (data root: TZK_DATA_ROOT or
# ../shared/data beside the checkout)
M="$(cd "$(dirname "$0")/../../data_manifests" && pwd)"
R="${TZK_DATA_ROOT:-$M/../../shared/data}"
W="${1:-tzk-second-way}"
mkdir -p "$W" && cd "$W"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
stamp ingest
tzk ingest $M/mnist.toml $M/omniglot-atlas.toml --store base.h5 --data-root $R
tzk ingest $M/mnist.toml $M/omniglot.toml $M/omniglot-atlas.toml --store full.h5 --data-root $R
stamp train
tzk train --store base.h5 --out runs/weak --kinds dataset --levels 3 --flow-steps 3 \
    --hidden 48 --balance dataset --warmup 20 --time-budget 9 --val-every 100 \
    --checkpoint-every 100 --val-images 1000 --quiet
stamp extend-label
tzk extend runs/weak --condition label --store base.h5 --out runs/labels
stamp extend-alphabet
tzk extend runs/labels --condition alphabet --store full.h5
stamp eval
tzk eval runs/labels --store full.h5 --split test --samples 16 --json > eval.json
stamp sample
tzk sample runs/labels --grid-by dataset -n 10 --temperature 0.7 --out grid-dataset.png
tzk sample runs/labels --grid-by label -n 10 --temperature 0.7 --out grid-label.png
tzk sample runs/labels --grid-by alphabet -n 10 --temperature 0.7 --out grid-alphabet.png
tzk sample runs/labels -n 40 --temperature 0.7 --out grid-joint.png
stamp done
