#!/usr/bin/env bash
# Build the node-agent .deb from this checkout:
#
#   bash packaging/build-deb.sh [--version VERSION] [--out DIR]
#
# writes DIR/node-agent_<version>_<arch>.deb (DIR defaults to dist/). Why a plain
# dpkg-deb build of a staged venv, and what goes where: packaging/README.md.
#
# Needs (Debian 12): python3 (3.11) with python3-venv, dpkg-dev (dpkg-shlibdeps),
# binutils (strip), and access to a Python package index for the pinned wheels of
# packaging/requirements*.txt. The resulting .deb fetches nothing when installed.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD

VERSION=""
OUT="$SRC/dist"
while [ $# -gt 0 ]; do
    case "$1" in
        --version) VERSION=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "build-deb: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

PKG=node-agent
PREFIX=/usr/lib/$PKG
# Debian's interpreter, never a pyenv or venv python found first on PATH: the bundled
# venv links to it, and the package depends on it.
PY=/usr/bin/python3
for tool in "$PY" dpkg-deb dpkg-shlibdeps strip; do
    command -v "$tool" >/dev/null || {
        echo "build-deb: $tool is missing: apt-get install python3-venv dpkg-dev binutils" >&2
        exit 1; }
done
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$PYVER" != 3.11 ]; then
    echo "build-deb: $PY is Python $PYVER; the package targets Debian 12's Python 3.11" >&2
    exit 1
fi
if [ -z "$VERSION" ]; then
    VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
fi
ARCH=$(dpkg --print-architecture)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/build-deb.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STAGE=$WORK/stage
VENV=$STAGE$PREFIX
step() { printf 'build-deb: %s\n' "$*" >&2; }

# 1. Build tools in a throw-away venv (pip here also installs into the staged venv,
#    which therefore carries no pip of its own).
# pip's chatter goes to a log, shown only when a step fails.
quiet() { "$@" >>"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log" >&2; echo "build-deb: failed: $*" >&2; exit 1; }; }
step "tools venv"
"$PY" -m venv "$WORK/tools"
quiet "$WORK/tools/bin/pip" install --disable-pip-version-check --only-binary=:all: \
    -r packaging/requirements-build.txt

# 2. A clean copy of the sources with freshly generated protocol modules: the
#    working tree's generated files may be stale or in use by a running test.
step "sources and protocol code"
mkdir -p "$WORK/src"
cp -a pyproject.toml README.md protos "$WORK/src/"
for pkg in runtime agent tui; do
    [ -d "$pkg" ] && cp -a "$pkg" "$WORK/src/"
done
find "$WORK/src" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
rm -f "$WORK/src"/runtime/protocol/*_pb2*.py* "$WORK/src"/runtime/protocol/.build.lock
quiet "$WORK/tools/bin/python" "$WORK/src/runtime/_protocol_build.py"
quiet "$WORK/tools/bin/pip" wheel --no-deps --no-build-isolation -w "$WORK/wheels" "$WORK/src"

# 3. The bundled environment: Debian's python3 plus pinned binary wheels, no pip.
step "bundled environment in $PREFIX"
"$PY" -m venv --without-pip "$VENV"
quiet "$WORK/tools/bin/pip" --python "$VENV/bin/python3" install --disable-pip-version-check \
    --no-compile --only-binary=:all: -r packaging/requirements.txt
quiet "$WORK/tools/bin/pip" --python "$VENV/bin/python3" install --disable-pip-version-check \
    --no-compile --no-deps "$WORK"/wheels/*.whl
SITE=$VENV/lib/python$PYVER/site-packages
DISTINFO=$(ls -d "$SITE"/runtime_cluster-*.dist-info)

# Entry points of ours that become /usr/bin commands (raytop once the tui exists).
mapfile -t ENTRY < <("$PY" - "$DISTINFO/entry_points.txt" <<'EOF'
import configparser, sys
cp = configparser.ConfigParser()
cp.read(sys.argv[1])
wanted = ("node-agent", "agentctl", "raytop")
for name, target in (cp["console_scripts"].items() if cp.has_section("console_scripts") else []):
    if name in wanted:
        print(f"{name} {target.strip()}")
EOF
)

# Relocate: nothing may name the staging directory; drop what a runtime never uses.
rm -f "$VENV"/bin/activate* "$VENV"/bin/Activate.ps1 "$DISTINFO/direct_url.json"
find "$VENV/bin" -mindepth 1 ! -name 'python*' -exec rm -f {} +
rm -rf "$VENV/include"
# A relative link to Debian's interpreter (lintian: absolute-symlink-in-top-level-folder).
ln -sfn ../../../bin/python3 "$VENV/bin/python3"
# PyYAML's C extension embeds its own libyaml; the pure-Python parser it falls back
# to reads cluster files just as well.
rm -f "$SITE"/yaml/_yaml.cpython-*.so "$SITE"/_yaml/*.so
sed -i "s|$VENV|$PREFIX|g; s|^command = .*|command = $PY -m venv $PREFIX|" "$VENV/pyvenv.cfg"
find "$STAGE" \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf {} +
if grep -rlI -- "$WORK" "$STAGE" >/dev/null; then
    echo "build-deb: these files still name the build directory:" >&2
    grep -rlI -- "$WORK" "$STAGE" >&2
    exit 1
fi
# Modes as Debian wants them (wheels carry executable .py and .so files), and shared
# objects stripped (lintian: unstripped-binary-or-object).
find "$STAGE" -type d -exec chmod 0755 {} +
find "$STAGE" -type f -exec chmod 0644 {} +
find "$VENV" -type f -name '*.so*' -exec strip --strip-unneeded --remove-section=.comment \
    --remove-section=.note {} +

# 4. Everything else the package installs.
step "unit, config, commands, docs"
install -D -m 0644 systemd/node-agent.service "$STAGE/lib/systemd/system/$PKG.service"
install -D -m 0644 systemd/agent.toml.example "$STAGE/etc/$PKG/agent.toml"
mkdir -p "$STAGE/usr/bin"
for line in "${ENTRY[@]}"; do
    name=${line%% *}; target=${line#* }; module=${target%%:*}; func=${target#*:}
    # `python3 -m module` reads best in ps and systemctl status; it needs the module to
    # run func() as __main__, else the entry point is called explicitly.
    modfile="$SITE/${module//.//}.py"
    if [ "$func" = main ] && grep -q '^if __name__ == "__main__":' "$modfile" 2>/dev/null; then
        run="-m $module"
    else
        run="-c 'import sys; from $module import $func; sys.argv[0] = \"$name\"; sys.exit($func())'"
    fi
    cat > "$STAGE/usr/bin/$name" <<EOF
#!/bin/sh
# $name: $target in node-agent's bundled environment ($PREFIX).
# -P: the current directory never shadows the bundled modules.
exec $PREFIX/bin/python3 -P $run "\$@"
EOF
    chmod 0755 "$STAGE/usr/bin/$name"
done
DOC=$STAGE/usr/share/doc/$PKG
install -D -m 0644 packaging/debian/copyright "$DOC/copyright"
install -m 0644 docs/agent.md "$DOC/agent.md"
[ -f docs/install.md ] && install -m 0644 docs/install.md "$DOC/install.md"
DATE=$(date -R -d "@${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")
sed -e "s|@VERSION@|$VERSION|g" -e "s|@DATE@|$DATE|g" packaging/debian/changelog.in \
    | gzip -9n > "$DOC/changelog.gz"
for page in packaging/man/*.[1-8]; do
    name=$(basename "$page"); section=${name##*.}
    [ -e "$STAGE/usr/bin/${name%.*}" ] || continue      # raytop's page once raytop exists
    install -d "$STAGE/usr/share/man/man$section"
    gzip -9n < "$page" > "$STAGE/usr/share/man/man$section/$name.gz"
done
install -D -m 0644 packaging/debian/lintian-overrides "$STAGE/usr/share/lintian/overrides/$PKG"

# 5. Control data: shared-library dependencies computed from the bundled objects.
step "control files"
mkdir -p "$WORK/shlibs/debian" "$STAGE/DEBIAN"
printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$PKG" "$PKG" > "$WORK/shlibs/debian/control"
mapfile -t OBJECTS < <(find "$VENV" -type f -name '*.so*')
SHLIBS=$(cd "$WORK/shlibs" && dpkg-shlibdeps -O --ignore-missing-info \
    $(printf -- '-l%s ' $(find "$VENV" -type d -name '*.libs')) "${OBJECTS[@]}" 2>/dev/null \
    | sed -n 's/^shlibs:Depends=//p')
SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
sed -e "s|@VERSION@|$VERSION|" -e "s|@ARCH@|$ARCH|" -e "s|@SIZE@|$SIZE|" \
    -e "s|@SHLIBS@|${SHLIBS:+, $SHLIBS}|" packaging/debian/control.in > "$STAGE/DEBIAN/control"
for script in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$script" "$STAGE/DEBIAN/$script"
done
install -m 0644 packaging/debian/conffiles "$STAGE/DEBIAN/conffiles"
(cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
    | xargs -0 md5sum > DEBIAN/md5sums)
chmod 0644 "$STAGE/DEBIAN/md5sums"

mkdir -p "$OUT"
DEB=$OUT/${PKG}_${VERSION}_${ARCH}.deb
step "dpkg-deb"
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >/dev/null
echo "$DEB ($(du -h "$DEB" | cut -f1), installed $(( SIZE / 1024 )) MiB)"
