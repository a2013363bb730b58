#!/usr/bin/env bash
# The Docker engine and base image for the container tests (tests/containers/).
#
#   engine.sh packages     print the apt packages still missing (one per line), only when the
#                          container tests are wanted: CI=true or CLOUDTRAIL_TEST_DOCKER=1
#   engine.sh start        when no engine answers and the tests are wanted, start dockerd in the
#                          background (vfs storage, no bridge, no iptables: host networking on
#                          127.0.0.1 only), wait for `docker info`, and record its pid so that
#                          `stop` ends only the daemon this script started. Exit status 0 only
#                          when it started one (tests/run then arms `stop` at exit), else 1
#   engine.sh stop         stop that daemon (no-op when this script did not start one)
#   engine.sh base-image NAME
#                          make sure image NAME exists: a debootstrapped minbase Debian bookworm
#                          with python3, python3-venv and ca-certificates (`docker import`), used
#                          in place of the official python image, which cannot be pulled here.
#                          Built once; later runs reuse the image the engine keeps.
#
# Why opt-in outside CI: installing and starting a Docker engine on a developer's machine unasked
# is rude. A developer who wants the container tests runs `CLOUDTRAIL_TEST_DOCKER=1 bash tests/run`
# (as root), or simply has an engine running already (then nothing is installed or started).
# Never fails tests/run by itself (`start && trap ...`): the container tests decide whether a
# missing engine is a skip or, under CI=true, a failure.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
state=${CLOUDTRAIL_DOCKER_STATE:-$repo/.work/docker}
pidfile=$state/dockerd.pid

say() { echo "tests/containers/engine.sh: $*" >&2; }

wanted() { [ "${CI:-}" = true ] || [ "${CLOUDTRAIL_TEST_DOCKER:-}" = 1 ]; }

engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

cmd_packages() {
  wanted || return 0
  command -v dockerd >/dev/null 2>&1 || echo docker.io
  command -v docker-compose >/dev/null 2>&1 || echo docker-compose
  command -v debootstrap >/dev/null 2>&1 || echo debootstrap
  return 0
}

cmd_start() {
  if engine_answers; then
    say "a Docker engine answers already; using it"
    return 1
  fi
  if ! wanted; then
    say "no Docker engine answers; container tests will skip (CLOUDTRAIL_TEST_DOCKER=1 to start one)"
    return 1
  fi
  if [ "$(id -u)" != 0 ] || ! command -v dockerd >/dev/null 2>&1; then
    say "cannot start dockerd (needs root and the docker.io package); container tests will not run"
    return 1
  fi
  mkdir -p "$state"
  say "starting dockerd (vfs, no bridge, no iptables); log: $state/dockerd.log"
  # setsid: the daemon must not get the terminal's signals meant for pytest.
  setsid dockerd --storage-driver=vfs --bridge=none --iptables=false --ip6tables=false \
    --pidfile "$state/dockerd.own.pid" >"$state/dockerd.log" 2>&1 < /dev/null &
  echo $! >"$pidfile"
  for _ in $(seq 1 60); do
    if engine_answers; then
      say "dockerd is up (pid $(cat "$pidfile"))"
      return 0
    fi
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      say "dockerd exited; last lines of its log:"
      tail -n 20 "$state/dockerd.log" >&2
      rm -f "$pidfile"
      return 1
    fi
    sleep 1
  done
  say "dockerd did not answer within 60 s; see $state/dockerd.log"
  return 0
}

cmd_stop() {
  [ -f "$pidfile" ] || return 0
  local pid
  # dockerd's own pid file names the daemon even if setsid forked in between.
  pid=$(cat "$state/dockerd.own.pid" 2>/dev/null || cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping the dockerd this script started (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$pidfile"
  return 0
}

# The first `URIs:` line of apt's sources (deb822), else the first `deb` line, else Debian's.
apt_mirror() {
  local uri
  uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 | awk '{print $2}')
  [ -n "$uri" ] || uri=$(grep -hsE '^deb ' /etc/apt/sources.list 2>/dev/null | head -n1 | awk '{print $2}')
  echo "${uri:-http://deb.debian.org/debian}"
}

cmd_base_image() {
  local name=${1:?usage: engine.sh base-image NAME}
  if docker image inspect "$name" >/dev/null 2>&1; then
    say "base image $name exists; reusing it"
    return 0
  fi
  if [ "$(id -u)" != 0 ] || ! command -v debootstrap >/dev/null 2>&1; then
    say "cannot make base image $name: needs root and debootstrap"
    return 1
  fi
  local rootfs mirror
  mkdir -p "$state"
  rootfs=$(mktemp -d "$state/rootfs.XXXXXX")
  mirror=$(apt_mirror)
  say "debootstrapping bookworm minbase from $mirror into $rootfs (about a minute)"
  if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$rootfs" "$mirror" >"$state/debootstrap.log" 2>&1; then
    say "debootstrap failed; last lines of $state/debootstrap.log:"
    tail -n 20 "$state/debootstrap.log" >&2
    rm -rf "$rootfs"
    return 1
  fi
  chmod 0755 "$rootfs"  # mktemp made it 0700: the image's / must be traversable by non-root
  # Keep the image small: vfs copies the whole rootfs for every layer built on top of it.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  tar -C "$rootfs" -c . | docker import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["python3"]' - "$name" >/dev/null
  local rc=$?
  rm -rf "$rootfs"
  [ $rc = 0 ] && say "base image $name imported"
  return $rc
}

case "${1:-}" in
  packages) cmd_packages ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  base-image) shift; cmd_base_image "$@" ;;
  *) echo "usage: $0 packages|start|stop|base-image NAME" >&2; exit 2 ;;
esac
