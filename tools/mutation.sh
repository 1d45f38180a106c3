#!/usr/bin/env bash
# Mutation testing of the modules whose results the tests must pin (docs/testing.md).
#   tools/mutation.sh attacks|training|eval|all [SCRATCH_DIR]
# Copies the checkout (without .git) to SCRATCH_DIR (default: a new temporary directory),
# adds that area's [tool.mutmut] table to the copy's pyproject.toml and runs mutmut 3 there
# with one worker. The checkout itself is never mutated. Needs `pip install mutmut==3.8.1`
# and pyens built in place (the compiled pyens/_C*.so is copied with the package).
set -euo pipefail
area=${1:?usage: tools/mutation.sh attacks|training|eval|all [SCRATCH_DIR]}
root=$(cd "$(dirname "$0")/.." && pwd)
if [ "$area" = all ]; then
  for a in attacks training eval; do "$0" "$a"; done
  exit 0
fi
command -v mutmut >/dev/null || { echo "mutmut is not installed: pip install mutmut==3.8.1" >&2; exit 2; }
scratch=${2:-$(mktemp -d "${TMPDIR:-/tmp}/pyens-mutation-$area.XXXXXX")}
mkdir -p "$scratch"
tar -C "$root" --exclude=.git --exclude=mutants --exclude='*.egg-info' --exclude=runs --exclude=build -cf - . \
  | tar -C "$scratch" -xf -

case $area in
  attacks)   # pyens/attacks/: ~1,500 mutants, ~10 min on one core
    mutate='["pyens/attacks/*"]'
    tests='["tests/test_mut_attacks.py", "tests/test_attacks.py", "tests/test_msd_rules.py", "tests/test_eval_attacks.py"]'
    args='["-p", "no:cacheprovider", "-x", "-q"]' ;;
  training)  # the training losses, the DML methods, consensus, DML ensembles: ~1,300 mutants, ~5 min
    mutate='["pyens/training/method_base.py", "pyens/training/methods.py", "pyens/training/dml_methods.py", "pyens/ensembles/consensus.py", "pyens/ensembles/dml.py"]'
    tests='["tests/test_mut_training.py", "tests/test_mut_dml.py", "tests/test_mut_consensus.py", "tests/test_training.py", "tests/test_training_inputs.py", "tests/test_dml.py"]'
    # the subprocess tests (DDP, CLI train, the main job, resume) kill nothing the others miss and cost minutes
    args='["-p", "no:cacheprovider", "-q", "-x", "-k", "not ddp and not cli_train and not main_job and not eval_recovers and not resume_continues"]' ;;
  eval)      # the robustness and transfer reports: ~800 mutants, ~7 min
    mutate='["pyens/eval/results.py", "pyens/eval/transfer.py"]'
    tests='["tests/test_eval.py", "tests/test_eval_suite.py", "tests/test_mut_report_transfer.py"]'
    args='["-p", "no:cacheprovider", "-q", "-k", "not pyens_report and not curves_and_plots and not sanity_checks"]' ;;
  *) echo "unknown area $area; expected attacks, training, eval or all" >&2; exit 2 ;;
esac

cat >> "$scratch/pyproject.toml" <<TOML

[tool.mutmut]
source_paths = ["pyens/"]
only_mutate = $mutate
pytest_add_cli_args_test_selection = $tests
pytest_add_cli_args = $args
also_copy = ["kernels/", "configs/", "csrc/", "tools/", "docs/", "setup.py", "README.md"]
TOML

cd "$scratch"
echo "mutation testing of $area in $scratch" >&2
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 mutmut run --max-children 1
mutmut results --all true | awk -F': ' '{n[$2]++} END {for (s in n) print s": "n[s]}' | sort
echo "survivors: cd $scratch && mutmut results; mutmut show NAME shows one" >&2
