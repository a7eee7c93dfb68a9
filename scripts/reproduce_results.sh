#!/usr/bin/env bash
# Regenerate every committed result from the current code: the experiment runs behind the pages in
# docs/results/ (copied to benchmarks/results/<name>.results.json), the forgetting-quality JSON,
# then the pages and the README's tables (docs/make_results.py). Each results page then names the
# commit and date that produced it. Runs are resumable: rerunning skips finished work.
#
#   scripts/reproduce_results.sh [small|all|forgetting|frontier|pages] ...   (default: small)
#
#   small       digits, Fashion-MNIST 4k, CIFAR-10 4k: pages and sequences; the exact Fashion-MNIST 4k page
#   all         small, then Fashion-MNIST, CIFAR-10 and CIFAR-100, then forgetting and frontier
#   forgetting  forgetting quality (N=12, 3 requests): digits and the 4k subsets of Fashion-MNIST, CIFAR-10,
#               CIFAR-100; then (N=8, class 0) the full Fashion-MNIST and CIFAR-10 training sets
#   frontier    forgetting quality of count values, count values with the whitened projection, and
#               exact unlearning (keys from a pool: another dataset, or the 4k subsets' unused training
#               images; count values, then ridge values) on digits and the 4k subsets
#               (benchmarks/results/frontier/),
#               then docs/results/figures/forgetting_frontier.png
#   pages       only regenerate docs/results and the README tables from the committed JSON
#
# Measured on the 2-core build machine with other jobs sharing the cores (one thread per job):
# small 19 min (pages 158 / 458 / 420 s, sequences 27-57 s); the CIFAR-10 page 51 min (the exact one 83 min, one worker) and its
# sequence 11 min, the Fashion-MNIST page 31 min (encoding included) and its sequence 4 min, the
# CIFAR-100 page 109 min (encoding included) and its sequence 92 min with 4-5 jobs on the cores;
# forgetting 13 / 47 / 48 / 70 min (digits, CIFAR-10 4k, Fashion-MNIST 4k, CIFAR-100 4k), 24 / 36 min
# (Fashion-MNIST, CIFAR-10; two jobs on the cores); frontier 2-11 min per count-value run, 30-40 min per
# key-pool run (three jobs on the cores), 24 min per own-kind run (two jobs), 26-29 min per ridge run on the
# 4k subsets and 13 min on digits (two jobs);
# encoding 7-20 min per 60,000-image set.
#
# CIFAR needs ../shared/data (or $DKVB_SHARED_DATA); without it those runs stop with a message
# naming the archive. Work goes to results/ and $WORK (default results/forgetting-work).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=benchmarks/results
WORK=${WORK:-results/forgetting-work}
SCRUB='scrub[lr=0.002,epochs=3,msteps=2,alpha=0.001,gamma=0.99,temperature=4.0]'

page() {  # <config> <page name> [--set ...]: run one config and keep its results for docs/results
  local config=$1 name=$2; shift 2
  "$PY" -m dkvb run "experiments/$config.yaml" --set "name=$name" "$@"
  cp "results/$name/results.json" "$OUT/$name.results.json"
  cp "results/$name/phases.md" "$OUT/$name.phases.md"; cp "results/$name/phases.json" "$OUT/$name.phases.json"
}

experiment() {  # <config> <page name> <sequence name> [--set ...]: run one config, then its request sequence
  local config=$1 name=$2 seq=$3; shift 3
  page "$config" "$name" "$@"
  "$PY" benchmarks/sequential_forgetting.py "experiments/$config.yaml" --set "name=$name" "$@" --out results/sequential \
    $(printf -- '--dkvb %s ' ${SERIES:-activations activations:refit_epochs=2 activations:refit_epochs=2,release_keys=true})
  cp "results/sequential/$name.json" "$OUT/sequential_$seq.json"
  cp "results/sequential/$name.png" "$OUT/sequential_$seq.png"
}

forgetting() {  # <config> <json name> [benchmark options]: N=12, 3 requests unless the options say otherwise
  local config=$1 name=$2; shift 2
  "$PY" benchmarks/forgetting_quality.py "experiments/$config.yaml" --num-models 12 --requests 3 \
    --work "$WORK/$name" --out "$OUT/forgetting_$name.json" "$@"
}

COUNTS=(--set train.value_init=counts --set train.epochs=0)
WHITENED=(--set model.projection=whitened)
POOL=(--set key_pool.train_limit=10000)
PARTS='dkvb-activations,dkvb-activations[recount_values=False],dkvb-activations[mask_keys=False],dkvb-drop-output'
EXACT='dkvb-activations,dkvb-activations[mask_keys=False],dkvb-drop-output'

frontier_set() {  # <config> <name> <key pool dataset> [benchmark options]
  local config=$1 name=$2 pool=$3; shift 3
  forgetting "$config" "$name" "$@" "${COUNTS[@]}" --work "$WORK/${name}_counts" --out "$OUT/frontier/forgetting_${name}_counts.json"
  forgetting "$config" "$name" "$@" "${COUNTS[@]}" "${WHITENED[@]}" --methods "$PARTS" \
    --work "$WORK/${name}_counts_whitened" --out "$OUT/frontier/forgetting_${name}_counts_whitened.json"
  forgetting "$config" "$name" "$@" "${COUNTS[@]}" "${WHITENED[@]}" "${POOL[@]}" --set "key_pool.name=$pool" \
    --methods "$EXACT" --work "$WORK/${name}_key_pool" --out "$OUT/frontier/forgetting_${name}_key_pool.json"
}

frontier_own_kind() {  # <config> <name> <dataset> [options]: keys from 10,000 training images outside the 4,000-image subset
  local config=$1 name=$2 data=$3; shift 3
  forgetting "$config" "$name" "$@" "${COUNTS[@]}" "${WHITENED[@]}" "${POOL[@]}" --set dataset.train_limit=4000 \
    --set "key_pool.name=$data" --methods "$EXACT" --work "$WORK/${name}_key_pool_own_kind" \
    --out "$OUT/frontier/forgetting_${name}_key_pool_own_kind.json"
}

frontier_ridge() {  # <config> <name> <key pool dataset> [options]: ridge values, the exact recipe's best ($SUFFIX names a variant)
  local config=$1 name=$2 pool=$3 out="${2}_ridge${SUFFIX:-}"; shift 3
  forgetting "$config" "$name" "$@" --set train.value_init=ridge --set train.epochs=0 "${WHITENED[@]}" "${POOL[@]}" \
    --set "key_pool.name=$pool" --methods "$EXACT" --work "$WORK/$out" --out "$OUT/frontier/forgetting_$out.json"
}

frontier() {
  frontier_set digits_effnet_lite0 digits cifar10
  frontier_set fashion_mnist_effnet_lite0 fashion_mnist_4k cifar100 --train-limit 4000
  frontier_set cifar10_effnet_lite0 cifar10_4k cifar100 --train-limit 4000
  frontier_own_kind fashion_mnist_effnet_lite0 fashion_mnist_4k fashion-mnist
  frontier_own_kind cifar10_effnet_lite0 cifar10_4k cifar10
  frontier_own_kind cifar100_effnet_lite0 cifar100_4k cifar100 --set model.topk=1  # the exact recipe selects one key
  frontier_ridge digits_effnet_lite0 digits cifar10
  frontier_ridge fashion_mnist_effnet_lite0 fashion_mnist_4k fashion-mnist --set dataset.train_limit=4000
  frontier_ridge cifar10_effnet_lite0 cifar10_4k cifar10 --set dataset.train_limit=4000
  SUFFIX=_top2 frontier_ridge cifar10_effnet_lite0 cifar10_4k cifar10 --set dataset.train_limit=4000 --set model.topk=2
  frontier_ridge cifar100_effnet_lite0 cifar100_4k cifar100 --set dataset.train_limit=4000 --set model.topk=1
  SUFFIX=_top4 frontier_ridge fashion_mnist_effnet_lite0 fashion_mnist_4k fashion-mnist --set dataset.train_limit=4000 --set model.topk=4
  SUFFIX=_top4 frontier_ridge cifar10_effnet_lite0 cifar10_4k cifar10 --set dataset.train_limit=4000 --set model.topk=4
  SUFFIX=_top4 frontier_ridge cifar100_effnet_lite0 cifar100_4k cifar100 --set dataset.train_limit=4000 --set model.topk=4
  local figure=() set model file
  while IFS='|' read -r set model file; do figure+=("$set|$model=$OUT/$file"); done <<'LIST'
digits|trained values|forgetting_digits.json
digits|count values|frontier/forgetting_digits_counts.json
digits|count values, whitened|frontier/forgetting_digits_counts_whitened.json
digits|exact: keys from a pool|frontier/forgetting_digits_key_pool.json
digits|exact: ridge values|frontier/forgetting_digits_ridge.json
CIFAR-10 4k|trained values|forgetting_cifar10_4k.json
CIFAR-10 4k|count values|frontier/forgetting_cifar10_4k_counts.json
CIFAR-10 4k|count values, whitened|frontier/forgetting_cifar10_4k_counts_whitened.json
CIFAR-10 4k|exact: keys from a pool|frontier/forgetting_cifar10_4k_key_pool.json
CIFAR-10 4k|exact: own kind|frontier/forgetting_cifar10_4k_key_pool_own_kind.json
CIFAR-10 4k|exact: ridge values|frontier/forgetting_cifar10_4k_ridge.json
CIFAR-10 4k|exact: ridge values, top-2|frontier/forgetting_cifar10_4k_ridge_top2.json
CIFAR-10 4k|exact: ridge values, top-4|frontier/forgetting_cifar10_4k_ridge_top4.json
Fashion-MNIST 4k|trained values|forgetting_fashion_mnist_4k.json
Fashion-MNIST 4k|count values|frontier/forgetting_fashion_mnist_4k_counts.json
Fashion-MNIST 4k|count values, whitened|frontier/forgetting_fashion_mnist_4k_counts_whitened.json
Fashion-MNIST 4k|exact: keys from a pool|frontier/forgetting_fashion_mnist_4k_key_pool.json
Fashion-MNIST 4k|exact: own kind|frontier/forgetting_fashion_mnist_4k_key_pool_own_kind.json
Fashion-MNIST 4k|exact: ridge values|frontier/forgetting_fashion_mnist_4k_ridge.json
Fashion-MNIST 4k|exact: ridge values, top-4|frontier/forgetting_fashion_mnist_4k_ridge_top4.json
CIFAR-100 4k|trained values (probe start)|forgetting_cifar100_4k.json
CIFAR-100 4k|exact: own kind|frontier/forgetting_cifar100_4k_key_pool_own_kind.json
CIFAR-100 4k|exact: ridge values|frontier/forgetting_cifar100_4k_ridge.json
CIFAR-100 4k|exact: ridge values, top-4|frontier/forgetting_cifar100_4k_ridge_top4.json
CIFAR-10|trained values|forgetting_cifar10.json
Fashion-MNIST|trained values|forgetting_fashion_mnist.json
LIST
  "$PY" benchmarks/forgetting_frontier.py "${figure[@]}" --out docs/results/figures/forgetting_frontier.png
}

small() {
  experiment digits_effnet_lite0 digits_effnet_lite0 digits
  experiment fashion_mnist_effnet_lite0 fashion_mnist_4k_effnet_lite0 fashion_mnist_4k --set dataset.train_limit=4000
  experiment cifar10_effnet_lite0 cifar10_4k_effnet_lite0 cifar10_4k --set dataset.train_limit=4000
  SERIES="activations:mask_keys=false activations" \
    experiment fashion_mnist_4k_exact_effnet_lite0 fashion_mnist_4k_exact_effnet_lite0 fashion_mnist_4k_exact  # exact
}

large() {
  experiment fashion_mnist_effnet_lite0 fashion_mnist_effnet_lite0 fashion_mnist
  cp results/fashion_mnist_effnet_lite0/forget_vs_{keys,examples}.png docs/results/figures/  # the README's figures
  experiment cifar10_effnet_lite0 cifar10_effnet_lite0 cifar10
  page cifar10_exact_effnet_lite0 cifar10_exact_effnet_lite0 --jobs 1  # exact unlearning: keys from CIFAR-100; 21.3 GB with one worker
  page fashion_mnist_50k_exact_effnet_lite0 fashion_mnist_50k_exact_effnet_lite0  # exact, sharded ridge values: 10 min
  # 50 requests: masking alone and re-fitting (release_keys would add about 30 minutes)
  SERIES="activations activations:refit_epochs=2" experiment cifar100_effnet_lite0 cifar100_effnet_lite0 cifar100
}

forgetting_all() {
  forgetting digits_effnet_lite0 digits
  forgetting fashion_mnist_effnet_lite0 fashion_mnist_4k --train-limit 4000
  forgetting cifar10_effnet_lite0 cifar10_4k --train-limit 4000
  forgetting cifar100_effnet_lite0 cifar100_4k --train-limit 4000
  local full="dkvb-activations,dkvb-activations[drop_start=False],dkvb-activations[mask_keys=False],dkvb-drop-output,drop-output,$SCRUB"
  forgetting fashion_mnist_effnet_lite0 fashion_mnist --num-models 8 --requests 1 --methods "$full"
  forgetting cifar10_effnet_lite0 cifar10 --num-models 8 --requests 1 --methods "$full"
}

for what in "${@:-small}"; do
  case $what in
    small) small ;;
    all) small; large; forgetting_all; frontier ;;
    forgetting) forgetting_all ;;
    frontier) frontier ;;
    pages) ;;
    *) echo "reproduce_results.sh: unknown target '$what' (small, all, forgetting, frontier or pages)" >&2; exit 2 ;;
  esac
done
"$PY" docs/make_results.py
