#!/usr/bin/env bash
# Fuzz every target for SECONDS each (default 60; CI's smoke run uses a few), from the seeds
# and the corpus kept between runs in fuzz/corpus (not committed). Prints each target's
# executions; any crash fails the run and leaves its input in fuzz/artifacts/<target>/.
# Builds on the stable toolchain (RUSTC_BOOTSTRAP lets cargo-fuzz pass its -Z flags) without
# a sanitizer: the code under test is safe Rust.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --version 0.13.2
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none -O
for target in review patch annotations; do
  mkdir -p "corpus/$target"
  seeds=()
  [ -d "seeds/$target" ] && seeds=("seeds/$target")
  log="$(mktemp)"
  if ! cargo fuzz run -s none -O "$target" "corpus/$target" "${seeds[@]}" -- \
      -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -60 "$log"
    echo "fuzz: $target FAILED" >&2
    exit 1
  fi
  execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
  cov="$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)"
  echo "fuzz: $target: $execs executions in ${seconds}s, ${cov:-cov: ?}, no crash"
  rm -f "$log"
done
