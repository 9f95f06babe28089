#!/usr/bin/env bash
# Throwaway PostgreSQL for the feedback_db tests: prints a SQLAlchemy URL on stdout, logs on stderr.
#   MMAPP_TEST_POSTGRES_URL=$(bash .ci/postgres.sh); export MMAPP_TEST_POSTGRES_URL   # start, or reuse
#   bash .ci/postgres.sh stop                                  # stop it and delete its files
# (Two statements, not `export X=$(...)`, so that under `set -e` a failed start stops the caller.)
# The cluster lives in $MMAPP_PG_DIR (default /tmp/mmapp-postgres), listens on 127.0.0.1 and a unix
# socket in that folder only, trusts local connections and runs without fsync: test data only.
set -euo pipefail
exec 3>&1 1>&2  # stdout carries the URL and nothing else

DIR=${MMAPP_PG_DIR:-/tmp/mmapp-postgres}
DATA=$DIR/data
DB=mmapp_test
SUPERUSER=postgres

log() { echo "postgres.sh: $*"; }

pg_bindir() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

install_postgres() {
    [ "$(id -u)" -eq 0 ] || { log "PostgreSQL is missing and we are not root: install the 'postgresql' package"; exit 1; }
    log "installing Debian package postgresql"
    # No default cluster on port 5432: we only need the binaries. --force-confold keeps this file.
    mkdir -p /etc/postgresql-common
    [ -e /etc/postgresql-common/createcluster.conf ] || echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.conf
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold postgresql >/dev/null
}

# initdb and postgres refuse to run as root: run them as the cluster owner. fd 3 (our stdout) is
# closed so the daemonized server does not hold the caller's $(...) pipe open.
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        (cd "$DIR" && runuser -u "$OWNER" -- "$@") 3>&- </dev/null
    else
        (cd "$DIR" && "$@") 3>&- </dev/null
    fi
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

print_url() {
    local port exists
    port=$(cat "$DIR/port")
    exists=$(as_owner "$BIN/psql" -h 127.0.0.1 -p "$port" -U "$SUPERUSER" -d postgres -v ON_ERROR_STOP=1 -qtAc \
        "SELECT 1 FROM pg_database WHERE datname = '$DB'")
    [ "$exists" = 1 ] || as_owner "$BIN/createdb" -h 127.0.0.1 -p "$port" -U "$SUPERUSER" "$DB"
    echo "postgresql+psycopg://$SUPERUSER@127.0.0.1:$port/$DB" >&3
}

BIN=$(pg_bindir || true)
OWNER=$( [ "$(id -u)" -eq 0 ] && echo postgres || id -un )

if [ "${1:-start}" = stop ]; then
    if [ -n "$BIN" ] && [ -f "$DATA/postmaster.pid" ]; then
        as_owner "$BIN/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null || true
    fi
    rm -rf "$DIR"
    log "stopped and removed $DIR"
    exit 0
fi
[ "${1:-start}" = start ] || { log "usage: $0 [start|stop]"; exit 2; }

[ -n "$BIN" ] || { install_postgres; BIN=$(pg_bindir); }
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin postgres
fi

if [ -f "$DIR/port" ] && as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    log "reusing the cluster running in $DIR"
    print_url
    exit 0
fi

rm -rf "$DIR"
mkdir -p "$DIR"
chown "$OWNER" "$DIR"
chmod 700 "$DIR"
log "initdb $DATA ($("$BIN/postgres" --version))"
as_owner "$BIN/initdb" -D "$DATA" -U "$SUPERUSER" --auth=trust -E UTF8 --locale=C --no-sync >"$DIR/initdb.log" 2>&1 \
    || { cat "$DIR/initdb.log"; exit 1; }
cat >>"$DATA/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
EOF

for _ in 1 2 3 4 5; do
    port=$((20000 + RANDOM % 20000))
    port_in_use "$port" && continue
    if as_owner "$BIN/pg_ctl" -D "$DATA" -l "$DIR/server.log" -o "-p $port" -w -t 30 start >/dev/null; then
        echo "$port" >"$DIR/port"
        log "running on 127.0.0.1:$port (log: $DIR/server.log)"
        print_url
        exit 0
    fi
    log "could not start on port $port, trying another"
done
cat "$DIR/server.log"
exit 1
