# Shared set-up of the cluster benchmarks (sourced; needs $root and $dir): builds the release
# binaries (cargo does nothing when they are current, so a stale binary is never measured),
# sets BULWARK_BIN and $e2e, makes bench/results, and stops the cluster in $dir on exit.
target=${CARGO_TARGET_DIR:-$root/target}
cargo build --release --locked -q -p bulwark -p bulwark-e2e
export BULWARK_BIN=$target/release/bulwark
e2e=$target/release/bulwark-e2e
results=$root/bench/results
mkdir -p "$results"
cleanup() { "$e2e" --dir "$dir" down >/dev/null 2>&1 || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM
