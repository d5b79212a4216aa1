#!/usr/bin/env bash
# Debian/Ubuntu libraries that Open3D needs at import time (libusb, GL, gomp) and for
# headless rendering (EGL/Vulkan for OffscreenRenderer, Xvfb for the legacy Visualizer).
# Installs only what is missing; without root or sudo it prints the command and exits 0.
set -euo pipefail

PACKAGES=(libusb-1.0-0 libgl1 libegl1 libgomp1 mesa-vulkan-drivers libvulkan1 xvfb)

if ! command -v dpkg >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    echo "warning: not a Debian-based system (no dpkg/apt-get); install the equivalents of" \
         "${PACKAGES[*]} with your package manager for Open3D rendering." >&2
    exit 0
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "system dependencies present: ${PACKAGES[*]}"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "warning: missing system packages: ${missing[*]}" >&2
    echo "warning: no root or passwordless sudo; run this yourself:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
echo "installing: ${missing[*]}"
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
