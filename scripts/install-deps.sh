#!/usr/bin/env bash
# Installs everything a fresh Debian 12 machine needs to build and test sparq.
# Debian packages: build tools, Vulkan loader/headers, glslang, Mesa lavapipe (a CPU Vulkan driver),
# the Khronos validation layer and doctest. PyPI: Jinja2 (used by the kernel generator at build time).
# The CUDA toolkit is not installed here: where CUDA is wanted it is expected on PATH (nvcc).
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
packages=(meson ninja-build pkg-config g++ python3 python3-pip
          libvulkan-dev glslang-tools mesa-vulkan-drivers vulkan-validationlayers vulkan-tools
          doctest-dev nlohmann-json3-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Jinja2 from PyPI for whichever python3 is first on PATH (the one Meson will run the generator with).
if ! python3 -c 'import jinja2' 2>/dev/null; then
  python3 -m pip install --quiet jinja2 2>/dev/null || python3 -m pip install --quiet --break-system-packages jinja2
fi
echo "sparq: dependencies installed"
