#!/usr/bin/env bash
# make image: the CPU image from deploy/docker/Dockerfile, built here offline with buildah over a local Debian 12
# base (base.sh), torch from the wheel pip finds on this machine. Output: a docker archive under
# $DSPARK_HOME/images, named by the content it was built from, so a second run with nothing changed is instant.
# Prints the archive's path; $DSPARK_HOME/images/dspark.ref holds the image name (docker.io/library/dspark:HASH).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${DSPARK_HOME:=$HOME/.cache/dspark}"
images=$DSPARK_HOME/images
py=${PY:-$DSPARK_HOME/venv/bin/python}
base=localhost/dspark-base:bookworm
torch=$(grep -oE '^TORCH := \S+' Makefile | cut -d' ' -f3)
mkdir -p "$images"

# the content: everything the build reads (the context the .dockerignore lets through, the build files, args)
content() {
  printf '%s\n' "$torch" "$base"
  find deploy/docker requirements.txt pyproject.toml README.md LICENSE protos services .dockerignore -type f \
    -not -path '*/__pycache__/*' -not -name '*_pb2*.py*' -not -path '*.egg-info/*' -print0 | sort -z | xargs -0 sha256sum
}
hash=$(content | sha256sum | cut -c1-12)
ref=docker.io/library/dspark:$hash
archive=$images/dspark-$hash.tar
if [ -s "$archive" ]; then
  echo "$ref" >"$images/dspark.ref"
  echo "$archive"
  exit 0
fi

# apt-get them on a fresh Debian machine (host-packages.sh fails when it cannot)
bash "$(dirname "$0")/../k8s/host-packages.sh" buildah debootstrap \
  || { echo "image.sh: buildah or debootstrap missing" >&2; exit 1; }
bh=(buildah --root "$images/storage" --runroot "$images/run" --storage-driver overlay)
bash deploy/docker/base.sh "$base" >&2

# torch from where pip gets it on this machine (a local wheel directory here; PyPI elsewhere), mounted at /wheels
wheels=$images/wheels
if ! ls "$wheels"/torch-"${torch#torch==}"*.whl >/dev/null 2>&1; then
  "$py" -m pip download -q --no-deps --only-binary=:all: "$torch" -d "$wheels" >&2
fi

# where pip reaches PyPI through a TLS-inspecting proxy, the host's CA bundle goes to the build's pip too
cert=${PIP_CERT:-$("$py" -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.cert='\(.*\)'$/\1/p" | head -1)}
certargs=()
[ -n "$cert" ] && [ -s "$cert" ] && certargs=(-v "$cert:/etc/ssl/build-ca.crt:ro" --build-arg PIP_CERT=/etc/ssl/build-ca.crt)

# root lacks CAP_SYS_RESOURCE here: runc fails to raise rlimits unless they are set explicitly; the build's RUN
# steps use the host network (no CNI bridge of buildah's own next to the cluster's)
"${bh[@]}" bud --layers --network host --ulimit nofile=10000:10000 --ulimit nproc=20000:20000 \
  --build-arg BASE="$base" --build-arg TORCH="$torch" --build-arg TORCH_INDEX= \
  -v "$wheels:/wheels:ro" "${certargs[@]}" -f deploy/docker/Dockerfile -t "$ref" . >&2
rm -f "$archive.partial"
"${bh[@]}" push -q "$ref" "docker-archive:$archive.partial:$ref" >&2
mv "$archive.partial" "$archive"
# keep the newest archive only
find "$images" -maxdepth 1 -name 'dspark-*.tar' -not -name "dspark-$hash.tar" -delete
echo "$ref" >"$images/dspark.ref"
echo "$archive"
