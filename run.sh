#!/usr/bin/env bash
# One entry point for a fresh machine: set everything up, then run the pipeline or the tests.
#   bash run.sh pipeline [snakemake args...]   # default params.yaml: Fashion-MNIST, CPU, 43 min (AMX) to ~85 min (AVX2) on 2 cores
#   bash run.sh tests [pytest args...]         # the test suite (what CI runs)
#   bash run.sh setup                          # only the setup
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
export DVC_NO_ANALYTICS=1          # DVC must not try to reach the network
export PIP_DISABLE_PIP_VERSION_CHECK=1

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

APT_UPDATED=
apt_update_once() {
    # A fresh machine needs `apt-get update` before its first install; once is enough for both installs.
    if [ -z "$APT_UPDATED" ]; then as_root apt-get update -qq; APT_UPDATED=1; fi
}

install_dataset() {
    # The default dataset without internet: Fashion-MNIST from Debian's dataset-fashion-mnist.
    if [ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then return; fi
    if ! command -v apt-get >/dev/null; then
        echo "Fashion-MNIST is missing and apt-get is not available: set data.source: download in params.yaml" >&2
        return
    fi
    echo "==> installing dataset-fashion-mnist (apt)"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq dataset-fashion-mnist >/dev/null
}

install_slurm() {
    # Slurm and munge for a real single-node cluster (tools/local_slurm.py, tests/test_workflow_slurm.py).
    local cmd missing=
    for cmd in slurmctld slurmd sinfo munged; do
        PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null || missing=1
    done
    if [ -z "$missing" ]; then return; fi
    if command -v sbatch >/dev/null; then  # a cluster's login node: use that cluster, install no daemons
        echo "sbatch found without local Slurm daemons: not installing them (tests/test_workflow_slurm.py will be skipped)" >&2
        return
    fi
    if ! command -v apt-get >/dev/null; then
        echo "Slurm is missing and apt-get is not available: tests/test_workflow_slurm.py will be skipped (fails under CI)" >&2
        return
    fi
    if [ "$(id -u)" -ne 0 ] && ! sudo -n true 2>/dev/null; then  # optional: only that test needs it (and root)
        echo "Slurm is missing and installing it needs root: tests/test_workflow_slurm.py will be skipped" >&2
        return
    fi
    echo "==> installing slurmctld slurmd slurm-client munge (apt)"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

install_browser() {
    # A real browser for the tests that open the pages we write (tests/browser.py): Debian's chromium-headless-shell.
    if command -v chromium-headless-shell >/dev/null; then return; fi
    if ! command -v apt-get >/dev/null || { [ "$(id -u)" -ne 0 ] && ! sudo -n true 2>/dev/null; }; then
        echo "chromium-headless-shell is missing and cannot be installed here: the browser tests will be skipped" \
             "(they fail under CI)" >&2
        return
    fi
    echo "==> installing chromium-headless-shell (apt)"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium-headless-shell >/dev/null
}

install_python() {
    local stamp="$VENV/.installed" want
    want=$(sha256sum pyproject.toml | cut -c1-16)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
    echo "==> creating $VENV and installing the project (pip; about a minute)"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    if ! "$VENV/bin/pip" install -e '.[test]' > "$VENV/pip.log" 2>&1; then
        tail -40 "$VENV/pip.log" >&2
        echo "pip install failed; the full log is $VENV/pip.log" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
}

setup() {
    install_dataset
    install_slurm
    install_browser
    install_python
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
}

cmd=${1:-pipeline}
shift || true
case "$cmd" in
    setup) setup ;;
    pipeline) setup; exec snakemake --cores all "$@" ;;
    tests) setup; exec python -m pytest "$@" ;;
    *) echo "usage: bash run.sh [setup|pipeline|tests] [args...]" >&2; exit 2 ;;
esac
