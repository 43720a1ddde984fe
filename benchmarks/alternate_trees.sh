#!/usr/bin/env bash
# `lmrc bench` at git revision REV and at this working tree, alternately, RUNS times each: the side-by-side
# comparison of two trees on a VM whose speed drifts. Prints each run's frame and stage medians.
#
#   benchmarks/alternate_trees.sh REV RUNS [lmrc bench arguments...]
#   benchmarks/alternate_trees.sh HEAD~1 3 --model lmrc-lite --compare A F --frames 20 --warmup 5 --threads 2 --precision bf16
#
# REV is checked out in a temporary worktree (removed at the end). Each run starts in its own tree's directory:
# Python puts the working directory first on sys.path, ahead of PYTHONPATH, so running from this tree would
# import this tree's lmrc for both. The native kernels are built per tree (their cache key is the source).
set -euo pipefail
rev=${1:?usage: $0 REV RUNS [bench arguments]}
runs=${2:?usage: $0 REV RUNS [bench arguments]}
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
old=$(mktemp -d)
trap 'git -C "$here" worktree remove --force "$old" >/dev/null 2>&1 || true' EXIT
git -C "$here" worktree add --detach "$old" "$rev" >/dev/null 2>&1
label_old=$(git -C "$old" rev-parse --short HEAD)
for ((i = 1; i <= runs; i++)); do
  for tree in "$old" "$here"; do
    label=$([ "$tree" = "$here" ] && echo "this tree" || echo "$label_old")
    out=$(cd "$tree" && PYTHONPATH="$tree" "$python" -c "
import sys, lmrc
assert lmrc.__file__.startswith('$tree'), lmrc.__file__  # the tree's own package, not an installed one
from lmrc.cli import main
sys.exit(main(['bench'] + sys.argv[1:]))" "$@" 2>&1)
    echo "== run $i, $label"
    echo "$out" | grep -E "^  (ms per frame|frames/s|key_encoding|value_encoding|global_read|local_reads|sequential_local_reads|decoder|other) " || echo "$out" | tail -5
  done
done
