#!/usr/bin/env bash
# Install natedit on a Debian gateway, from a clone of its repository, as root:
#
#   sudo deploy/install.sh [--enable] [--prefix DIR] [--root DIR] [--python PY]
#
#   /opt/natedit/venv                      natedit and its Python packages (--prefix DIR)
#   /opt/natedit/share/                    README, rule files, Prometheus/Grafana originals
#   /usr/local/bin/natedit                 -> /opt/natedit/venv/bin/natedit
#   /etc/natedit/policy.yaml               deploy/policy.yaml, only when there is none
#   /etc/systemd/system/natedit.service    deploy/systemd/natedit.service
#   /var/lib/natedit/                      state (the call table across restarts)
#   /etc/prometheus/natedit-alerts.yml     alert rules
#   /etc/prometheus/prometheus.yml         deploy/prometheus/prometheus.yml, only when there is none
#   /etc/grafana/provisioning/datasources/natedit.yaml   only when there is none
#   /etc/grafana/provisioning/dashboards/natedit.yaml
#   /var/lib/grafana/dashboards/natedit/natedit.json
#
# Installs the Debian packages natedit needs when they are missing. Safe to run
# again: what is already in place is left alone (natedit is reinstalled into its
# venv only when the source changed), a policy or datasource file you edited is
# never overwritten. --enable also starts natedit (systemctl enable --now);
# without it, check the policy first and start it yourself.
# --root DIR installs below DIR instead of / (for packaging and tests): no apt,
# no systemctl, and the venv's scripts name their interpreter by its path below DIR.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=""
PREFIX=/opt/natedit
PY=python3
ENABLE=""

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }
say() { printf '[install] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
        --python) PY=${2:?--python needs an interpreter}; shift 2 ;;
        --enable) ENABLE=yes; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
case "$PREFIX" in /*) ;; *) die "--prefix must be absolute: $PREFIX" ;; esac
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
    [ "$ROOT" = / ] && ROOT=""
fi
[ -n "$ROOT" ] && [ -n "$ENABLE" ] && die "--enable and --root do not mix"

# Runtime: netfilter tools, and what NetfilterQueue is built with.
DEBS=(python3 python3-venv python3-dev gcc libnetfilter-queue1 libnetfilter-queue-dev
      libnfnetlink-dev iptables iproute2 kmod)

missing_debs() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}

if [ -z "$ROOT" ]; then
    [ "$(id -u)" -eq 0 ] || die "run as root (sudo $0), or stage with --root DIR"
    if command -v dpkg-query >/dev/null; then
        mapfile -t want < <(missing_debs "${DEBS[@]}")
        if [ ${#want[@]} -gt 0 ]; then
            say "installing Debian packages: ${want[*]}"
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq
            apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
        fi
    fi
fi

# -- natedit into its venv ---------------------------------------------------------------
VENV=$ROOT$PREFIX/venv
source_stamp() {
    (cd "$SRC" && find pyproject.toml README.md natedit -type f \
        \( -name '*.py' -o -name '*.toml' -o -name '*.md' -o -name py.typed \) \
        -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha1sum | sha1sum | cut -c1-16)
}
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PY" -m venv "$VENV"
fi
stamp=$(source_stamp)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ "$(cat "$VENV/.natedit-source" 2>/dev/null)" != "$stamp" ]; then
    say "installing natedit from $SRC into $PREFIX/venv"
    # built from a copy: nothing is written into the clone, no stale build/ is reused
    mkdir "$tmp/src"
    cp -r "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/natedit" "$tmp/src/"
    pip=("$VENV/bin/pip" install -q --disable-pip-version-check)
    "${pip[@]}" --force-reinstall --no-deps "$tmp/src" 2> >(grep -v '^WARNING: Location' >&2)
    "${pip[@]}" "$tmp/src" 2> >(grep -v '^WARNING: Location' >&2)
    echo "$stamp" > "$VENV/.natedit-source"
else
    say "unchanged $PREFIX/venv (natedit $("$VENV/bin/python" -c \
        'import importlib.metadata as m; print(m.version("natedit"))' 2>/dev/null || echo '?'))"
fi

# -- files ----------------------------------------------------------------------------------
# put SRC DEST MODE [keep]: install SRC as DEST unless identical; "keep": never overwrite
put() {
    local src=$1 dest=$ROOT$2 mode=$3 keep=${4:-}
    if [ -e "$dest" ]; then
        if cmp -s "$src" "$dest"; then
            say "unchanged $2"
            return
        fi
        if [ -n "$keep" ]; then
            local original=${src#"$SRC"/}
            say "kept $2 (yours; the original is $PREFIX/share/${original#deploy/})"
            return
        fi
    fi
    install -D -m "$mode" "$src" "$dest"
    say "installed $2"
}
link() {
    local target=$1 dest=$ROOT$2
    if [ "$(readlink "$dest" 2>/dev/null)" = "$target" ]; then
        say "unchanged $2 -> $target"
        return
    fi
    mkdir -p "$(dirname "$dest")"
    ln -sfn "$target" "$dest"
    say "installed $2 -> $target"
}
dir() {
    local dest=$ROOT$1 mode=$2
    if [ -d "$dest" ]; then
        say "unchanged $1/"
    else
        install -d -m "$mode" "$dest"
        say "installed $1/"
    fi
}

# The unit names the command by /usr/local/bin/natedit, and its README by the prefix.
unit=$tmp/natedit.service
sed "s#/opt/natedit/#$PREFIX/#g" "$SRC/deploy/systemd/natedit.service" > "$unit"

for f in README.md deploy/policy.yaml deploy/rules/natedit.iptables deploy/rules/natedit.nft \
         deploy/rules/natedit-iptables.nft \
         deploy/systemd/natedit.service deploy/prometheus/prometheus.yml \
         deploy/prometheus/natedit-alerts.yml deploy/grafana/provisioning/datasources/natedit.yaml \
         deploy/grafana/provisioning/dashboards/natedit.yaml deploy/grafana/dashboards/natedit.json
do
    put "$SRC/$f" "$PREFIX/share/${f#deploy/}" 644
done
link "$PREFIX/venv/bin/natedit" /usr/local/bin/natedit
put "$SRC/deploy/policy.yaml" /etc/natedit/policy.yaml 644 keep
put "$unit" /etc/systemd/system/natedit.service 644
dir /var/lib/natedit 755
put "$SRC/deploy/prometheus/natedit-alerts.yml" /etc/prometheus/natedit-alerts.yml 644
put "$SRC/deploy/prometheus/prometheus.yml" /etc/prometheus/prometheus.yml 644 keep
put "$SRC/deploy/grafana/provisioning/datasources/natedit.yaml" \
    /etc/grafana/provisioning/datasources/natedit.yaml 644 keep
put "$SRC/deploy/grafana/provisioning/dashboards/natedit.yaml" \
    /etc/grafana/provisioning/dashboards/natedit.yaml 644
put "$SRC/deploy/grafana/dashboards/natedit.json" \
    /var/lib/grafana/dashboards/natedit/natedit.json 644

"$VENV/bin/natedit" check-policy "$ROOT/etc/natedit/policy.yaml" >/dev/null 2>&1 \
    || say "warning: $ROOT/etc/natedit/policy.yaml is not valid: natedit check-policy says why"

if [ -z "$ROOT" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    if [ -n "$ENABLE" ]; then
        systemctl enable --now natedit
        say "natedit enabled and started: systemctl status natedit; journalctl -u natedit"
        exit 0
    fi
fi
say "done. Next: edit /etc/natedit/policy.yaml, natedit check-policy /etc/natedit/policy.yaml,"
say "      then systemctl enable --now natedit (keep your MASQUERADE rule: natedit adds none)"
