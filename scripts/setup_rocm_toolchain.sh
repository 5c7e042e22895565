#!/bin/sh
# Unpack a ROCm cross-compilation toolchain for the tvm target without installing anything:
# Debian's AMDGPU device libraries (ocml/ockl bitcode) and lld 19, extracted with dpkg -x.
#
#   scripts/setup_rocm_toolchain.sh [DEST]      (default: $LLMC_ROCM_TOOLCHAIN or ~/.cache/llmc/rocm-toolchain)
#
# Afterwards `llmc compile ... --target tvm --device rocm --arch gfx942` finds it by itself
# (it looks in $LLMC_ROCM_TOOLCHAIN, then ~/.cache/llmc/rocm-toolchain). Needs apt-get and dpkg
# (Debian/Ubuntu) and the package index; about 28 MB is downloaded. No root needed.
set -eu

DEST="${1:-${LLMC_ROCM_TOOLCHAIN:-${HOME}/.cache/llmc/rocm-toolchain}}"
PACKAGES="rocm-device-libs lld-19 libllvm19"

for tool in apt-get dpkg; do
    command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool not found (Debian/Ubuntu only)" >&2; exit 2; }
done

mkdir -p "$DEST/debs" "$DEST/root" "$DEST/bin"
DEST="$(cd "$DEST" && pwd)"
cd "$DEST/debs"
# shellcheck disable=SC2086
apt-get download $PACKAGES
for deb in ./*.deb; do
    dpkg -x "$deb" "$DEST/root"
done

LIBDIR="$DEST/root/usr/lib/x86_64-linux-gnu"
LLD="$DEST/root/usr/lib/llvm-19/bin/ld.lld"
[ -x "$LLD" ] || { echo "error: $LLD missing after unpacking" >&2; exit 1; }
[ -d "$LIBDIR/amdgcn/bitcode" ] || { echo "error: $LIBDIR/amdgcn/bitcode missing after unpacking" >&2; exit 1; }

# ld.lld needs libLLVM-19 from the unpacked tree.
cat > "$DEST/bin/ld.lld" <<WRAPPER
#!/bin/sh
LD_LIBRARY_PATH="$LIBDIR\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$LLD" "\$@"
WRAPPER
chmod +x "$DEST/bin/ld.lld"
"$DEST/bin/ld.lld" --version

echo "ROCm toolchain ready in $DEST"
echo "  ROCM_PATH=$LIBDIR"
echo "  PATH=$DEST/bin:\$PATH"
