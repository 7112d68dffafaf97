#!/usr/bin/env bash
# Set up igsp on a fresh machine: the Debian packages of the offline data sources, a virtual
# environment with torch, igsp (editable, with test and offline extras) and the baseline plugins,
# and the offline pretrained backbone. Safe to run again: finished steps are skipped quickly.
#
# Environment: PYTHON (default python3), IGSP_VENV (default .venv), IGSP_SKIP_APT=1 to skip the
# Debian packages, IGSP_SKIP_BACKBONE=1 to skip building the igsp-lite backbone.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${IGSP_VENV:-.venv}
DEBIAN_PACKAGES=(dataset-fashion-mnist fonts-noto-color-emoji unicode-data openclipart-png)
DEBIAN_NO_RECOMMENDS=(tuxpaint-stamps-default)

log() { printf '[setup] %s\n' "$*"; }

pip_install() {
    # pip lists every extra index it cannot read; print its real messages only, keep its status.
    local output status=0
    output=$("$VENV/bin/pip" install --disable-pip-version-check -q "$@" 2>&1) || status=$?
    printf '%s\n' "$output" | grep -v -e '^WARNING: Location' -e '^$' || true
    if [ "$status" -ne 0 ]; then
        log "pip install $* failed with exit status $status; see the messages above."
        exit "$status"
    fi
}

install_debian_packages() {
    local missing=()
    for package in "${DEBIAN_PACKAGES[@]}" "${DEBIAN_NO_RECOMMENDS[@]}"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "Debian data packages present."
        return
    fi
    if [ "$(id -u)" -ne 0 ]; then
        log "Missing Debian packages: ${missing[*]}. Run as root: apt-get update && apt-get install -y ${DEBIAN_PACKAGES[*]} && apt-get install -y --no-install-recommends ${DEBIAN_NO_RECOMMENDS[*]}"
        return
    fi
    log "Installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${DEBIAN_PACKAGES[@]}" >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${DEBIAN_NO_RECOMMENDS[@]}" >/dev/null
}

torch_requirements() {
    # open_clip and timm need torchvision; these pairs import together (x86_64: CUDA build that
    # also runs on the CPU; aarch64: CPU build).
    case "$(uname -m)" in
        aarch64|arm64) echo "torch==2.9.1 torchvision==0.24.1" ;;
        *) echo "torch==2.14.1 torchvision==0.29.1" ;;
    esac
}

[ "${IGSP_SKIP_APT:-0}" = 1 ] || install_debian_packages

if [ ! -x "$VENV/bin/python" ]; then
    log "Creating the virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi

# shellcheck disable=SC2046
if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
    log "Installing $(torch_requirements)"
    pip_install $(torch_requirements)
fi
log "Installing igsp and the baseline plugins"
pip_install -e ".[test,offline,plot]" -e plugins/igsp-baselines
# animal-mnist declares TensorFlow as a dependency that its data does not need.
pip_install --no-deps animal-mnist

if [ "${IGSP_SKIP_BACKBONE:-0}" != 1 ]; then
    log "Building the offline backbone igsp-lite (about 2 to 6 minutes the first time, cached after)"
    "$VENV/bin/igsp" --quiet backbone build igsp-lite
fi
log "Done. Activate with: source $VENV/bin/activate"
