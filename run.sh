#!/usr/bin/env bash
# One entry point for a fresh machine: set everything up, then run the pipeline or the tests.
#   bash run.sh pipeline [snakemake args...]   # default params.yaml: Fashion-MNIST, CPU, ~20 min
#   bash run.sh tests [pytest args...]         # the test suite (what CI runs)
#   bash run.sh setup                          # only the setup
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
export DVC_NO_ANALYTICS=1          # DVC must not try to reach the network
export PIP_DISABLE_PIP_VERSION_CHECK=1

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

install_dataset() {
    # The default dataset without internet: Fashion-MNIST from Debian's dataset-fashion-mnist.
    if [ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then return; fi
    if ! command -v apt-get >/dev/null; then
        echo "Fashion-MNIST is missing and apt-get is not available: set data.source: download in params.yaml" >&2
        return
    fi
    echo "==> installing dataset-fashion-mnist (apt)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq dataset-fashion-mnist >/dev/null
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
