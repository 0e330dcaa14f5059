#!/usr/bin/env bash
# Installs napari-medsam and everything it needs on a fresh Debian/Ubuntu machine, into ./.venv.
# System packages: a virtual X server and Mesa OpenGL for napari (and its tests) on machines
# without a screen, and the X/XCB libraries Qt 6 loads.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
APT_PACKAGES=(
  python3-venv xvfb xauth fonts-dejavu-core
  libgl1 libgl1-mesa-dri libegl1 libglx-mesa0 libopengl0 libglib2.0-0 libdbus-1-3 libfontconfig1 libfreetype6
  libx11-xcb1 libxkbcommon0 libxkbcommon-x11-0 libxcb-cursor0 libxcb-glx0 libxcb-icccm4 libxcb-image0
  libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-shm0 libxcb-sync1 libxcb-xfixes0
  libxcb-xinerama0 libxcb-xkb1
)
if command -v apt-get >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[pyqt6,testing]"
echo "napari-medsam installed in $(pwd)/.venv"
