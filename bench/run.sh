#!/usr/bin/env bash
# Reproduces BENCHMARKS.md: builds in release, installs Google's portserver (PyPI portpicker +
# psutil) in a virtualenv, and runs the harness as root in a private network namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
# Cluster mode is built in (BENCH_ONLY=cluster needs protoc to build, and Debian's etcd-server).
cargo build --release --locked -p portres -p portres-bench --features portres/cluster,portres-bench/cluster
venv=target/bench-venv
if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q portpicker==1.6.0 psutil
fi
portserver=$(find "$venv" -name portserver.py | head -1)
export PORTRES_BIN=$PWD/target/release/portres PORTSERVER=$portserver PATH=$PWD/$venv/bin:$PATH
exec unshare -n sh -c 'ip link set lo up && exec target/release/portres-bench'
