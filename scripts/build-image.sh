#!/usr/bin/env bash
# Builds the Weir container image FROM scratch with buildah (no registry, no daemon needed) and
# writes it as an OCI archive.
#
#   scripts/build-image.sh [--binary PATH] [--tag REF] [--out FILE.tar]
#
# The image holds exactly what the binary needs: the binary (stripped), the shared libraries
# `ldd` lists for it (glibc, libgcc_s, the dynamic loader) and the CA bundle, plus an empty
# /tmp. It runs as the numeric user 65532 with no shell. Default binary: a fresh release build.
# Prints the image's size at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=""
tag="localhost/weir:$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
for tool in buildah ldd strip; do
  command -v "$tool" >/dev/null || { echo "build-image: $tool not found (apt-get install buildah binutils)" >&2; exit 3; }
done
if [ -z "$binary" ]; then
  cargo build --release --locked
  binary=target/release/weir
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/root/usr/local/bin" "$ctx/root/etc/ssl/certs" "$ctx/root/tmp"
strip -o "$ctx/root/usr/local/bin/weir" "$binary"
# The shared-library closure, at the paths the loader looks for them.
ldd "$binary" | awk '/=> \//{print $3} /^\s*\/[^ ]*ld-linux/{print $1}' | while read -r lib; do
  mkdir -p "$ctx/root$(dirname "$lib")"
  cp -L "$lib" "$ctx/root$lib"
done
# rustls reads the system roots from here (and SSL_CERT_FILE).
cp -L /etc/ssl/certs/ca-certificates.crt "$ctx/root/etc/ssl/certs/ca-certificates.crt"
chmod 1777 "$ctx/root/tmp"
cat > "$ctx/Containerfile" <<'CF'
FROM scratch
COPY root/ /
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/weir"]
CMD ["operator"]
CF
buildah bud --quiet --layers=false -t "$tag" "$ctx" >/dev/null
if [ -n "$out" ]; then
  rm -f "$out"
  buildah push --quiet "$tag" "oci-archive:$out:$tag" >/dev/null
fi
size=$(du -sb "$ctx/root" | cut -f1)
echo "image $tag: $((size / 1024 / 1024)) MiB uncompressed${out:+, written to $out}"
