#!/usr/bin/env bash
# Reproduces every number and plot of docs/results.md with the `facenet-jax` command line.
#
#   experiments/evaluate_all.sh            # all sections
#   experiments/evaluate_all.sh bfw yale   # some of: setup bfw bfw_all yale orl omniglot
#                                          #   omniglot_within wild
#
# Inputs: two finished training runs (see docs/results.md for their commands) and the data
# under $DATA. Outputs: JSON and PNG files under $OUT/<name>/ (never inside the repository).
# Runs one evaluation at a time (the machine this was written on has 2 shared CPU cores).
# UNTRAINED=0 skips the untrained baselines of omniglot and omniglot_within (ablation runs).
# Face rows are measured without mirror averaging (--no-flip) and, in *_flip, with it, whatever
# the run's config.eval.flip (the CLI's default).
set -euo pipefail
cd "$(dirname "$0")/.."

# Paths are relative to the repository root (the script runs there); override any of them.
PY=${PY:-python}
DATA=${DATA:-../shared/data}
BFW_RUN=${BFW_RUN:-workdirs/bfw}
OMNI_RUN=${OMNI_RUN:-workdirs/omniglot}
OUT=${OUT:-workdirs/results}
UNTRAINED=${UNTRAINED:-1}  # 0: skip the untrained Omniglot baselines (ablation runs).
CLI=("$PY" -m facenet_jax.cli)
if (($#)); then SECTIONS=("$@"); else SECTIONS=(setup bfw bfw_all yale orl omniglot omniglot_within wild); fi

want() { [[ " ${SECTIONS[*]} " == *" $1 "* ]]; }

# evaluate NAME WORKDIR ARGS...: `facenet-jax evaluate` into $OUT/NAME (metrics.json + plots).
evaluate() {
  local name=$1 workdir=$2
  shift 2
  echo "== $name" >&2
  mkdir -p "$OUT/$name"
  "${CLI[@]}" evaluate --workdir "$workdir" --output-dir "$OUT/$name" --no-progress --json "$@" \
    >"$OUT/$name/stdout.json"
}

# episodes NAME WORKDIR ARGS...: `facenet-jax episodes` into $OUT/NAME.
episodes() {
  local name=$1 workdir=$2
  shift 2
  echo "== $name $*" >&2
  mkdir -p "$OUT/$name"
  "${CLI[@]}" episodes --workdir "$workdir" --output-dir "$OUT/$name" --no-progress --json "$@" \
    >/dev/null
}

if want setup; then
  # 1. The BFW run's own identity split, as folders the CLI can read: $OUT/trees/bfw_test[_flat]
  #    and bfw_train[_flat] hold folders of symlinks to the images of the test split (held out
  #    from training) and of the train split. Same split code and config as training.
  # Untrained baselines need no setup: `--untrained` rebuilds a run's step-0 network from its
  # seed (`inference.untrained_embedder`).
  # Run from a file with a __main__ guard: preparing the run's data (when its cache is gone)
  # spawns worker processes, which must re-import the script.
  mkdir -p "$OUT"
  cat >"$OUT/setup.py" <<'EOF'
import os
import shutil
import sys

import numpy as np

from facenet_jax import checkpoints
from facenet_jax.data import input_pipeline


def main(bfw_run, out):
    config = checkpoints.load_config(bfw_run)
    dataset = input_pipeline.create_dataset(config)
    root = dataset.split_info("train")["root"]
    for split in ("test", "train"):
        ids = np.unique(dataset.labels[dataset.splits[split]])
        # <group>/<identity>/ (--group-depth 1), and flat <group>__<identity>/ (--group-depth 0):
        # without groups the CLI draws impostor pairs from any identity, as the training run's own
        # evaluation does, and --head-train (read with the evaluated root's --group-depth) needs
        # the flat tree next to a root without groups.
        for tree, sep in ((f"bfw_{split}", "/"), (f"bfw_{split}_flat", "__")):
            tree = os.path.join(out, "trees", tree)
            shutil.rmtree(tree, ignore_errors=True)
            for lab in ids:
                name = dataset.identity_names[lab]  # "<group>/<identity>"
                src, dst = os.path.join(root, name), os.path.join(tree, name.replace("/", sep))
                os.makedirs(dst)
                for f in sorted(os.listdir(src)):
                    os.symlink(os.path.join(src, f), os.path.join(dst, f))
            print(f"{tree}: {len(ids)} identities", file=sys.stderr)


if __name__ == "__main__":
    main(*sys.argv[1:])
EOF
  "$PY" "$OUT/setup.py" "$BFW_RUN" "$OUT"
fi

BFW_TEST="$OUT/trees/bfw_test"
BFW_TRAIN="$OUT/trees/bfw_train"
BFW_TEST_FLAT="$OUT/trees/bfw_test_flat"
BFW_TRAIN_FLAT="$OUT/trees/bfw_train_flat"

if want bfw; then
  # Held-out BFW identities, per group; the similarity head is fitted on the training identities.
  evaluate bfw_heldout "$BFW_RUN" --no-flip --root "$BFW_TEST" --group-depth 1 --head-train "$BFW_TRAIN"
  evaluate bfw_heldout_flip "$BFW_RUN" --root "$BFW_TEST" --group-depth 1 --flip
  evaluate bfw_heldout_untrained "$BFW_RUN" --untrained --no-flip --root "$BFW_TEST" --group-depth 1
  # Impostors from any identity (not only the same group): the training run's eval.json protocol.
  evaluate bfw_heldout_any_impostor "$BFW_RUN" --no-flip --root "$BFW_TEST_FLAT" --head-train "$BFW_TRAIN_FLAT"
  evaluate bfw_heldout_any_impostor_flip "$BFW_RUN" --flip --root "$BFW_TEST_FLAT"
  evaluate bfw_heldout_any_impostor_untrained "$BFW_RUN" --untrained --no-flip --root "$BFW_TEST_FLAT"
fi

if want wild; then
  # The LFW-format in-the-wild stand-in: the held-out crops pasted into uncropped 250x250
  # photos, one pairs.txt (10 identity-disjoint folds) for the photos and the tight crops.
  "$PY" experiments/make_wild_pairs.py --root "$BFW_TEST_FLAT" --out "$OUT/wild_set"
  for kind in wild tight; do
    evaluate "${kind}_pairs" "$BFW_RUN" --no-flip --pairs "$OUT/wild_set/$kind/pairs.txt" --root "$OUT/wild_set/$kind"
    evaluate "${kind}_pairs_untrained" "$BFW_RUN" --untrained --no-flip --pairs "$OUT/wild_set/$kind/pairs.txt" \
      --root "$OUT/wild_set/$kind"
  done
  for kind in wild tight; do
    evaluate "${kind}_pairs_flip" "$BFW_RUN" --flip --pairs "$OUT/wild_set/$kind/pairs.txt" \
      --root "$OUT/wild_set/$kind"
  done
fi

if want bfw_all; then
  # All 800 BFW identities (90% were seen in training or validation): context, not a test.
  evaluate bfw_all_identities "$BFW_RUN" --no-flip --root "$DATA/bfw" --group-depth 1
fi

if want yale; then
  evaluate yale "$BFW_RUN" --no-flip --root "$DATA/extended_yaleb/CroppedYale" --head-train "$BFW_TRAIN_FLAT"
  evaluate yale_flip "$BFW_RUN" --flip --root "$DATA/extended_yaleb/CroppedYale"
  evaluate yale_untrained "$BFW_RUN" --untrained --no-flip --root "$DATA/extended_yaleb/CroppedYale"
fi

if want orl; then
  evaluate orl "$BFW_RUN" --no-flip --root "$DATA/orl" --head-train "$BFW_TRAIN_FLAT"
  evaluate orl_flip "$BFW_RUN" --flip --root "$DATA/orl"
  evaluate orl_untrained "$BFW_RUN" --untrained --no-flip --root "$DATA/orl"
fi

if want omniglot; then
  EVAL_ALPHABETS="$DATA/omniglot/images_evaluation.zip/images_evaluation"
  for way in 5 20; do
    episodes omniglot_episodes "$OMNI_RUN" --root "$EVAL_ALPHABETS" --group-depth 1 \
      --way "$way" --shot 1 --episodes 1000
    [[ $UNTRAINED == 0 ]] && continue
    episodes omniglot_episodes_untrained "$OMNI_RUN" --untrained --root "$EVAL_ALPHABETS" \
      --group-depth 1 --way "$way" --shot 1 --episodes 1000
  done
  evaluate omniglot_verification "$OMNI_RUN" --root "$EVAL_ALPHABETS" --group-depth 1
fi

if want omniglot_within; then
  # The harder, customary protocol (Lake et al. 2015; Koch et al. 2015): the 20 classes of an
  # episode all come from one alphabet. 200 episodes in each of the 20 evaluation alphabets.
  EVAL_ALPHABETS="$DATA/omniglot/images_evaluation.zip/images_evaluation"
  WITHIN="$OUT/omniglot_within_alphabet"
  mapfile -t ALPHABETS < <("$PY" -c '
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
print("\n".join(sorted({n.split("/")[1] for n in names if n.count("/") == 3 and n.endswith(".png")})))
' "$DATA/omniglot/images_evaluation.zip")
  TAGS=(trained untrained)
  [[ $UNTRAINED == 0 ]] && TAGS=(trained)
  for tag in "${TAGS[@]}"; do
    flags=()
    [[ $tag == untrained ]] && flags=(--untrained)
    for alphabet in "${ALPHABETS[@]}"; do
      episodes "omniglot_within_alphabet/$tag/$alphabet" "$OMNI_RUN" "${flags[@]}" \
        --root "$EVAL_ALPHABETS/$alphabet" --way 20 --shot 1 --episodes 200
    done
  done
  # Mean over the 20 x 200 episodes, and its 95% interval from the pooled episode variance.
  "$PY" - "$WITHIN" "${TAGS[*]}" "${ALPHABETS[@]}" <<'EOF'
import json
import math
import os
import sys

within, tags, alphabets = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
for tag in tags:
    runs = []
    for a in alphabets:
        with open(os.path.join(within, tag, a, "episodes_20way_1shot.json")) as f:
            runs.append(json.load(f))
    n = sum(r["num_episodes"] for r in runs)
    mean = sum(r["accuracy"] * r["num_episodes"] for r in runs) / n
    # Per alphabet, ci95 = 1.96 * std / sqrt(n_a) (std with ddof=1): recover the sums of squares.
    ss = sum(
        (r["num_episodes"] - 1) * (r["ci95"] * math.sqrt(r["num_episodes"]) / 1.96) ** 2
        + r["num_episodes"] * (r["accuracy"] - mean) ** 2
        for r in runs
    )
    summary = {
        "accuracy": mean,
        "ci95": 1.96 * math.sqrt(ss / (n - 1)) / math.sqrt(n),
        "num_episodes": n,
        "way": 20,
        "shot": 1,
        "per_alphabet": {a: r["accuracy"] for a, r in zip(alphabets, runs, strict=True)},
    }
    with open(os.path.join(within, f"summary_{tag}.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    print(f"{tag}: within-alphabet 20-way 1-shot {mean:.4f} +- {summary['ci95']:.4f}")
EOF
fi
echo "results under $OUT" >&2
