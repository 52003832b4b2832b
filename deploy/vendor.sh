#!/usr/bin/env bash
# Vendor the chat page's two browser libraries from the npm registry into relay/web/static/vendor/:
#   marked     (Markdown -> HTML)           lib/marked.esm.js   -> vendor/marked.esm.js
#   dompurify  (HTML sanitizer)             dist/purify.es.mjs  -> vendor/purify.es.js
# The files are committed; run this only to upgrade (edit the versions below), then commit.
# Needs node and npm. `npm pack` checks each tarball against the registry's integrity hash.
set -euo pipefail

MARKED_VERSION=18.2.1
DOMPURIFY_VERSION=3.4.18

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/relay/web/static/vendor"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

cd "$TMP"
npm pack --silent "marked@$MARKED_VERSION" "dompurify@$DOMPURIFY_VERSION" >/dev/null
mkdir marked dompurify
tar -xzf "marked-$MARKED_VERSION.tgz" -C marked --strip-components=1
tar -xzf "dompurify-$DOMPURIFY_VERSION.tgz" -C dompurify --strip-components=1

mkdir -p "$DEST"
# Served as .js: every Python's mimetypes knows .js, not every one knows .mjs (module scripts
# need a JavaScript MIME type, and the pages send nosniff). The source-map comments stay; the
# maps are not vendored (browsers fetch them only with developer tools open).
cp marked/lib/marked.esm.js "$DEST/marked.esm.js"
cp dompurify/dist/purify.es.mjs "$DEST/purify.es.js"
cp marked/LICENSE "$DEST/LICENSE.marked"
cp dompurify/LICENSE "$DEST/LICENSE.dompurify"

{
  echo "# Written by deploy/vendor.sh; do not edit by hand."
  echo "marked $MARKED_VERSION"
  echo "dompurify $DOMPURIFY_VERSION"
  (cd "$DEST" && sha256sum marked.esm.js purify.es.js)
} >"$DEST/VERSIONS"
echo "vendored into $DEST:" >&2
cat "$DEST/VERSIONS" >&2
