#!/usr/bin/env bash
# The recipe's ablations on validation data (issue 25, item 8): each variant of the
# SmolLM2-135M-Instruct-CLS recipe trained and calibrated in its own workdir with the
# validation source (forgelm's probes) held out of training, then its validation report
# (safety_align/validation_report.py); no variant reads a test prompt (--evaluate=false).
# Prints the README's ablation table at the end.
#
#   launch/ablations.sh [ROOT] [VARIANT ...]   # default ROOT runs/ablations, every variant
#
# The recipe's workdir (else the first variant's) imports the source model and caches its
# answers; the others hard-link the import and start from a copy of that cache. Each run
# resumes where it stopped.
set -euo pipefail

root=${1:-runs/ablations}
shift || true
python=${PYTHON:-.venv/bin/python}
export SAFETY_ALIGN_WHEELS=${SAFETY_ALIGN_WHEELS:-$HOME/.cache/safety_align/wheels}

# Each variant's flags beside the recipe (configs/smollm2_135m_cls.py's default: every
# parameter trained). The top10 rows are the recipe before full fine-tuning (layers 20-29 and
# the [CLS] parameters) and what was measured beside it; the trained_prefix rows the recipe
# before that (the refusals' prefix an LM target).
declare -A FLAGS=(
  [recipe]=""
  [seed1]="--train_seed=1"
  [top10]="--train_variant=top10"
  [top10_seed1]="--train_variant=top10 --train_seed=1"
  [top20]="--train_variant=top20"
  [top10_lambda0.3]="--train_variant=top10+lambda0.3"
  [top10_eot_cls]="--train_variant=top10+eot_cls"
  [trained_prefix]="--train_variant=top10+trained_prefix"
  [trained_prefix_seed1]="--train_variant=top10+trained_prefix --train_seed=1"
  [trained_prefix_top20]="--train_variant=trained_prefix+top20"
  [lambda0.3]="--train_variant=lambda0.3"
  [lambda3]="--train_variant=lambda3"
  [eot_cls]="--train_variant=eot_cls"
  [benign1000]="--n_benign=1000"
)
ORDER=(recipe seed1 top10 top10_seed1 top20 top10_lambda0.3 lambda3 top10_eot_cls trained_prefix
       trained_prefix_seed1 trained_prefix_top20)
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=("${ORDER[@]}")

first="$root/recipe"  # the cache of the source's answers the others start from
[ -d "$first/import" ] || first="$root/${variants[0]}"
runs=""
for v in "${variants[@]}"; do
  [ -n "${FLAGS[$v]+set}" ] || { echo "unknown variant $v (${ORDER[*]})" >&2; exit 2; }
  wd="$root/$v"
  if [ "$wd" != "$first" ] && [ ! -d "$wd" ] && [ -d "$first/import" ]; then
    mkdir -p "$wd"
    cp -al "$first/import" "$first/source" "$first/tfds" "$wd/"
    cp -r "$first/responses" "$wd/"
  fi
  # shellcheck disable=SC2086
  "$python" -m safety_align.demo_real --workdir="$wd" --evaluate=false \
      --calibration_schedules=annealing ${FLAGS[$v]}
  runs="$runs${runs:+,}$v=$wd"
done
# The frozen-source probe and the source model beside the recipe (the first variant).
"$python" -m safety_align.validation_report --workdir="$root/${variants[0]}" --baselines >/dev/null
"$python" -m safety_align.tools.ablation_table --runs="$runs"
