#!/usr/bin/env bash
# Builds the built-in codecs (codecs/json, codecs/raw) into codecs/json.wasm and
# codecs/raw.wasm, reproducibly: the same sources and the same rustc give the same bytes
# wherever the repository, CARGO_HOME or the toolchain lives.
#
#   codecs/build.sh           build, copy the modules, record `rustc -V` in codecs/TOOLCHAIN
#   codecs/build.sh --check   rebuild a scratch copy of the sources and compare with the
#                             committed modules; exit 1 when they differ. Skipped (exit 0)
#                             when the wasm32 target is missing or rustc is not the one
#                             in codecs/TOOLCHAIN, since another compiler emits other bytes.
set -euo pipefail

codecs_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
target=wasm32-unknown-unknown
codecs=(json raw)

case "${1:-}" in
  "") mode=build ;;
  --check) mode=check ;;
  *) echo "usage: codecs/build.sh [--check]" >&2; exit 2 ;;
esac

rustc="${RUSTC:-rustc}"
sysroot="$("$rustc" --print sysroot)"
version="$("$rustc" -V)"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"

if [[ ! -d "$sysroot/lib/rustlib/$target/lib" ]]; then
  if [[ $mode == check ]]; then
    echo "codecs/build.sh --check: skipped: the $target target is not installed (rustup target add $target)"
    exit 0
  fi
  echo "codecs/build.sh: the $target target is not installed (rustup target add $target)" >&2
  exit 1
fi

# Only this script decides the flags: nothing from the environment may change the bytes.
for name in $(compgen -e); do
  case "$name" in
    CARGO_PROFILE_*|CARGO_BUILD_*|CARGO_TARGET_*|CARGO_ENCODED_RUSTFLAGS|CARGO_INCREMENTAL) unset "$name" ;;
  esac
done

# Builds the codecs whose sources sit in $1 (a codecs/ workspace) into $2, each crate in
# its own target directory.
build_into() {
  local sources="$1" out="$2" name
  # Paths in panic locations would otherwise embed where the sources, the registry and
  # the toolchain happen to live.
  # The shadow stack's bounds are exported so that the engine can give its pages back
  # while a connection is idle (docs/codec-abi.md, "Optional exports").
  export RUSTFLAGS="--remap-path-prefix=$sources=/wirepool/codecs --remap-path-prefix=$cargo_home=/cargo --remap-path-prefix=$sysroot=/rustc -C link-arg=--export=__stack_low -C link-arg=--export=__stack_high"
  for name in "${codecs[@]}"; do
    (cd "$sources/$name" && cargo build --quiet --release --locked --target "$target" --target-dir "$sources/$name/target")
    cp "$sources/$name/target/$target/release/wirepool_codec_$name.wasm" "$out/$name.wasm"
  done
}

if [[ $mode == build ]]; then
  build_into "$codecs_dir" "$codecs_dir"
  echo "$version" > "$codecs_dir/TOOLCHAIN"
  for name in "${codecs[@]}"; do
    echo "codecs/$name.wasm: $(wc -c < "$codecs_dir/$name.wasm") bytes"
  done
  exit 0
fi

committed_version="$(cat "$codecs_dir/TOOLCHAIN" 2>/dev/null || echo "nothing recorded")"
if [[ "$version" != "$committed_version" ]]; then
  echo "codecs/build.sh --check: skipped: the committed modules were built by '$committed_version', this machine has '$version'"
  exit 0
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/codecs" "$scratch/out"
cp "$codecs_dir/Cargo.toml" "$codecs_dir/Cargo.lock" "$scratch/codecs/"
for name in sdk "${codecs[@]}"; do
  mkdir -p "$scratch/codecs/$name"
  (cd "$codecs_dir/$name" && tar --exclude=./target -cf - .) | (cd "$scratch/codecs/$name" && tar -xf -)
done
build_into "$scratch/codecs" "$scratch/out"

stale=()
for name in "${codecs[@]}"; do
  if ! cmp -s "$scratch/out/$name.wasm" "$codecs_dir/$name.wasm"; then
    stale+=("codecs/$name.wasm")
  fi
done
if (( ${#stale[@]} > 0 )); then
  echo "codecs/build.sh --check: FAILED: ${stale[*]} does not match its sources; run codecs/build.sh and commit the result" >&2
  exit 1
fi
echo "codecs/build.sh --check: ok: codecs/json.wasm and codecs/raw.wasm match their sources ($version)"
