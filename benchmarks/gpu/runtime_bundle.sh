# Sourced by the prepare scripts: bundle_runtime DIR writes what a GPU host without a package index needs
# to run llmc's tvm artifacts: DIR/tvm-runtime.tgz (a runtime-only TVM: the package without
# libtvm_compiler.so and sources, 6-7 MiB instead of the 96 MiB wheel; tvm/base.py then loads only
# libtvm_runtime.so, and llmc loads the CUDA plugin: targets/tvm/build.py) and DIR/whl/ (cp312 wheels the
# host lacks). Needs $PY (a python with the tvm extra installed).
bundle_runtime() {
    local dir=$1 sp plat
    mkdir -p "$dir/whl"
    sp=$("$PY" -c "import tvm, pathlib; print(pathlib.Path(tvm.__file__).parent.parent)")
    tar -C "$sp" -czf "$dir/tvm-runtime.tgz" --exclude=tvm/lib/libtvm_compiler.so --exclude=tvm/3rdparty \
        --exclude=tvm/src --exclude=tvm/web --exclude=tvm/include --exclude=tvm/lib64 --exclude=__pycache__ tvm
    plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64"
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat \
        -d "$dir/whl" apache-tvm-ffi==0.1.14.post1 gguf==0.19.0 jsonschema jsonschema-specifications referencing \
        rpds-py
}
