#!/usr/bin/env bash
# GRPO on GSM8K with verl 0.9.1, prompts chosen by mpts. Usage:
#   MODEL=/path/to/Qwen2.5-0.5B-Instruct DATA=$HOME/data/gsm8k OUT=runs/verl-gsm8k \
#     examples/verl/run.sh [overrides/mpts_hmm3.txt] [extra Hydra overrides...]
# Needs verl's GPU environment with mpts installed into it (README.md next to this script).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# a user error is one line and exit status 2, as everywhere in mpts
refuse() { echo "error: $1" >&2; exit 2; }
[[ -n "${MODEL:-}" ]] || refuse "set MODEL to a local model directory"
[[ -n "${DATA:-}" ]] || refuse "set DATA to the folder of train.parquet and test.parquet"
export MODEL DATA OUT="${OUT:-runs/verl-gsm8k}"
selection="$here/overrides/mpts_beta.txt"
if [[ $# -gt 0 && -f "$1" ]]; then selection="$1"; shift; fi
# one override per line; comments and blank lines dropped; ${MODEL} ${DATA} ${OUT} filled in
read_overrides() {
  grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$1" \
    | sed -e "s|\${MODEL}|$MODEL|g" -e "s|\${DATA}|$DATA|g" -e "s|\${OUT}|$OUT|g"
}
mapfile -t args < <(read_overrides "$here/overrides/grpo_gsm8k_1gpu.txt"; read_overrides "$selection")
exec python -m mpts.integrations.verl "${args[@]}" "$@"
