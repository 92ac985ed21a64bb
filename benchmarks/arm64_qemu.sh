#!/usr/bin/env bash
# Build an aarch64 Python with the ARM64 builds of numpy, onnx, onnxruntime and OpenVINO,
# to run under qemu-user on this x86-64 Debian machine (benchmarks/arm64_qemu.py runs it).
#
#   bash benchmarks/arm64_qemu.sh [TARGET]      (default: $DINOSERVE_ARM64 or ~/.cache/dinoserve/arm64)
#
# Nothing is installed into the system: Debian's arm64 packages of python3.11 and the
# libraries the wheels need are fetched by apt-get with a private state folder (the
# system's own sources, restricted to arm64) and unpacked with dpkg-deb into
# TARGET/sysroot; the wheels, at the versions this repository's .venv has, are fetched
# from PyPI for manylinux aarch64 and unpacked into TARGET/site-packages. A second run
# rebuilds from the downloads it kept (TARGET/downloads) and swaps the result into place.
set -euo pipefail

TARGET=$(realpath -m "${1:-${DINOSERVE_ARM64:-$HOME/.cache/dinoserve/arm64}}")
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}   # the x86 Python whose package versions the ARM one copies
DOWNLOADS=$TARGET/downloads
t0=$(date +%s)
say() { echo "arm64_qemu.sh [+$(( $(date +%s) - t0 ))s] $*"; }

[ -x /usr/bin/qemu-aarch64 ] || { echo "needs qemu-user: apt-get install qemu-user" >&2; exit 2; }
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "the .venv must be Python 3.11, as Debian 12 arm64 is"'

# python3.11 and what its standard library and the wheels load (readelf -d NEEDED, checked
# with every import under qemu); apt's full closure would add dpkg, tar and more, unused here
DEBS=(libc6 libgcc-s1 gcc-12-base libstdc++6 libgomp1 zlib1g libbz2-1.0 liblzma5 libexpat1 libffi8 libssl3
      libsqlite3-0 libuuid1 libcrypt1 libncursesw6 libtinfo6 libreadline8 readline-common libnsl2 libtirpc3
      libtirpc-common libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libkeyutils1 libcom-err2
      media-types libpython3.11-minimal libpython3.11-stdlib python3.11-minimal)
PACKAGES=(numpy pillow onnx onnxruntime openvino openvino-telemetry protobuf ml_dtypes flatbuffers packaging typing_extensions)
WHEELS=()
for p in "${PACKAGES[@]}"; do
    WHEELS+=("$p==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p")")
done

# ---- Debian arm64 packages, with apt's state kept apart from the system's
apt=$DOWNLOADS/apt
mkdir -p "$apt"/etc/apt/sources.list.d "$apt"/etc/apt/preferences.d "$apt"/etc/apt/apt.conf.d "$apt"/lists/partial \
         "$apt"/archives/partial "$DOWNLOADS"/debs "$DOWNLOADS"/wheels
: > "$apt"/status
# the system's own Debian sources, restricted to arm64 (deb822 files, else the one-line list)
shopt -s nullglob
sources=(/etc/apt/sources.list.d/*.sources)
if [ ${#sources[@]} -gt 0 ]; then
    for f in "${sources[@]}"; do
        awk 'BEGIN{RS=""; ORS="\n\n"} /(^|\n)Types:[^\n]*deb/ {print $0 "\nArchitectures: arm64"}' "$f" \
            > "$apt/etc/apt/sources.list.d/${f##*/}"
    done
else
    sed -E 's/^deb (\[[^]]*\] )?/deb [arch=arm64] /; /^deb-src/d' /etc/apt/sources.list > "$apt"/etc/apt/sources.list
fi
cat > "$apt"/apt.conf <<EOF
Dir::Etc "$apt/etc/apt";
Dir::Etc::TrustedParts "/etc/apt/trusted.gpg.d";
Dir::State::Lists "$apt/lists";
Dir::State::status "$apt/status";
Dir::Cache::Archives "$apt/archives";
Dir::Cache::pkgcache "$apt/pkgcache.bin";
Dir::Cache::srcpkgcache "$apt/srcpkgcache.bin";
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
Acquire::Languages "none";
APT::Sandbox::User "root";
EOF
say "apt-get download ${#DEBS[@]} arm64 packages"
APT_CONFIG=$apt/apt.conf apt-get -q update > /dev/null
rm -f "$DOWNLOADS"/debs/*.deb   # only this run's candidates (a security update replaces a version)
(cd "$DOWNLOADS"/debs && APT_CONFIG=$apt/apt.conf apt-get -q download "${DEBS[@]}" > /dev/null)

sysroot=$TARGET/sysroot.new
rm -rf "$sysroot" && mkdir -p "$sysroot"/etc
for deb in "$DOWNLOADS"/debs/*.deb; do dpkg-deb -x "$deb" "$sysroot"; done
# an empty cache, so the guest's loader never reads the host's x86 one
: > "$sysroot"/etc/ld.so.cache

# ---- wheels for manylinux aarch64 (openvino's are tagged manylinux_2_35; bookworm has glibc 2.36)
platforms=()
for tag in manylinux2014 manylinux_2_17 manylinux_2_28 manylinux_2_31 manylinux_2_35 manylinux_2_36; do
    platforms+=(--platform "${tag}_aarch64")
done
pip_args=(--only-binary=:all: "${platforms[@]}" --python-version 3.11 --implementation cp --abi cp311 --no-deps)
say "pip download ${WHEELS[*]}"
# this machine's pip constraint and local indexes are for x86 torch; aarch64 wheels come from PyPI
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }   # this machine's pip config
PIP_CONSTRAINT= PIP_EXTRA_INDEX_URL= "$PY" -m pip download -q "${pip_args[@]}" -d "$DOWNLOADS"/wheels "${WHEELS[@]}" 2>&1 | quiet
site=$TARGET/site-packages.new
rm -rf "$site"
PIP_CONSTRAINT= PIP_EXTRA_INDEX_URL= "$PY" -m pip install -q --no-compile --no-index --find-links "$DOWNLOADS"/wheels \
    "${pip_args[@]}" --target "$site" "${WHEELS[@]}" 2>&1 | quiet
[ -d "$site"/onnxruntime ] || { echo "pip could not install the aarch64 wheels into $site" >&2; exit 1; }
rm -rf "$site"/bin   # console scripts with x86 shebangs

# ---- swap in, then compile bytecode with the host's 3.11 (same magic) so emulation does not
for part in sysroot site-packages; do
    rm -rf "$TARGET/$part.old"
    if [ -e "$TARGET/$part" ]; then mv "$TARGET/$part" "$TARGET/$part.old"; fi
    mv "$TARGET/$part.new" "$TARGET/$part"
    rm -rf "$TARGET/$part.old"
done
rm -rf "$TARGET"/roots   # per-CPU prefixes of the old sysroot; arm64_qemu.py makes them anew
"$PY" -m compileall -q -x '/(test|tests|idlelib)/' "$TARGET"/sysroot/usr/lib/python3.11 "$TARGET"/site-packages \
    > /dev/null || true
printf '%s\n' "${WHEELS[@]}" > "$TARGET"/wheels.txt
say "done: $TARGET ($(du -sh --exclude=downloads "$TARGET" | cut -f1))"
