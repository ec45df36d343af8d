#!/usr/bin/env bash
# Start or stop one node of a Ray cluster for noprop_dist on a bare machine (no containers).
# `bash launch/cluster.sh --help` tells everything; the README's "Running on a Ray cluster" too.
#
#   bash launch/cluster.sh head                                   # head on loopback, token auth
#   bash launch/cluster.sh worker --address 127.0.0.1:6379        # a worker joins it
#   RAY_ADDRESS=http://127.0.0.1:8265 bash launch/submit.sh --config mnist --run-dir /abs/run
#   bash launch/cluster.sh stop                                   # stops the node of /tmp/ray
#
# Sourced by launch/submit.sh for the helpers (ray lookup, token set-up, reachability check);
# sourcing defines functions and runs nothing.
set -euo pipefail

NOPROP_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NOPROP_MIN_TOKEN_CHARS=32

cluster_usage() {
  cat <<'EOF'
Usage: bash launch/cluster.sh head   [OPTIONS]
       bash launch/cluster.sh worker --address HEAD:PORT [OPTIONS]
       bash launch/cluster.sh stop   [--temp-dir DIR]

Starts one Ray node with `ray start` on this machine (detached, unless --foreground), waits
until it is up and prints how to add workers, submit jobs and stop it. Several nodes fit on
one machine: give each its own --temp-dir and --ports-base.

Options:
  --address HOST:PORT  worker: the head's GCS address (the head prints it; port 6379 by default)
  --host ADDR          the address this node announces to the others; the head's dashboard and
                       job API listen on it too. Default 127.0.0.1 (loopback): the job API takes
                       clients of this machine only and workers join through loopback (Ray's
                       core ports listen beyond it anyway, see Authentication). Any other
                       address opens the cluster to ADDR's network on purpose and needs token
                       auth (refused with RAY_AUTH_MODE=disabled).
  --port N             head: GCS port (default 6379)
  --dashboard-port N   head: dashboard and job API port (default 8265)
  --num-cpus N         CPUs this node offers (default: all)
  --num-gpus N         GPUs this node offers (default: all that Ray detects)
  --resources JSON     custom resources, e.g. '{"node_a": 1}'
  --temp-dir DIR       this node's Ray temp/log directory (default /tmp/ray); one node per
                       directory: its pid file and log are DIR/noprop_node.{pid,log}
  --ports-base N       take every port of this node from N..N+99 instead of Ray's defaults:
                       node manager N, object manager N+1, dashboard agent HTTP N+2 and gRPC
                       N+3, runtime-env agent N+4, metrics N+5, Ray client server N+6 (head),
                       worker processes N+10..N+99
  --token-file FILE    token file (default $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token)
  --foreground         run in the foreground until Ctrl-C/SIGTERM (systemd, tmux, containers)
  --timeout S          seconds to wait for the node to come up (default 60)
  -- ARGS              passed to `ray start` unchanged
  -h, --help           this text

Authentication (Ray token auth; Ray reads these at start, on every node and client):
  RAY_AUTH_MODE=token (default) needs the same secret on every node and client, from
  RAY_AUTH_TOKEN or a 0600 token file. The head generates one into the token file when there
  is none and prints how to hand it on; workers and clients never generate one.
  RAY_AUTH_MODE=disabled turns auth off; set it the same way on every node and client.
  Ray 2.60 listens on all interfaces for its GCS, raylet and object-manager ports whatever
  --host says, so leave auth on unless this machine's ports are unreachable from elsewhere.

Environment: RAY_BIN (the `ray` to run; default `ray` on PATH, else .venv/bin/ray),
RAY_AUTH_MODE, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH.
Exit status: 0 node up (or stopped), 1 the node could not start or stop, 2 bad arguments or
token, 3 the head cannot be reached or refused this node's token.
EOF
}

die() {  # die EXIT_CODE MESSAGE: one line on stderr
  local code="$1"; shift
  echo "$(basename "$0"): error: $*" >&2
  exit "$code"
}

note() { echo "$(basename "$0"): $*" >&2; }

# The `ray` executable: $RAY_BIN, else `ray` on PATH, else the project's .venv/bin/ray.
find_ray() {
  if [ -n "${RAY_BIN:-}" ]; then
    [ -x "$RAY_BIN" ] || die 1 "RAY_BIN=$RAY_BIN is not an executable; point it at Ray's \`ray\` (e.g. .venv/bin/ray) or unset it"
    RAY="$RAY_BIN"
  elif command -v ray >/dev/null 2>&1; then
    RAY="$(command -v ray)"
  elif [ -x "$NOPROP_REPO/.venv/bin/ray" ]; then
    RAY="$NOPROP_REPO/.venv/bin/ray"
  else
    die 1 "\`ray\` not found: run \`bash launch/setup.sh\` (installs .venv/bin/ray with the pinned Ray), put Ray on PATH, or set RAY_BIN"
  fi
}

# tcp_open HOST PORT [SECONDS]: 0 if something accepts a TCP connection there.
tcp_open() {
  timeout "${3:-3}" bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# split_host_port HOST:PORT -> sets HP_HOST, HP_PORT (accepts [v6]:port); 1 if malformed.
split_host_port() {
  local s="$1"
  HP_PORT="${s##*:}"
  HP_HOST="${s%:*}"
  HP_HOST="${HP_HOST#[}"; HP_HOST="${HP_HOST%]}"
  [[ "$s" == *:* && -n "$HP_HOST" && "$HP_PORT" =~ ^[0-9]+$ ]]
}

file_mode() { stat -c %a "$1" 2>/dev/null || stat -f %Lp "$1"; }

# auth_setup ROLE (head|worker|client): exports RAY_AUTH_MODE and the token source for `ray`.
# Sets AUTH_DESC (what to print), AUTH_FILE (the token file, empty when none is used) and
# AUTH_ENV (the variables to put before a `ray` command printed for the user).
auth_setup() {
  local role="$1" mode="${RAY_AUTH_MODE:-token}" file
  AUTH_FILE=""
  AUTH_ENV="RAY_AUTH_MODE=$mode"
  case "$mode" in
    disabled)
      export RAY_AUTH_MODE     # disabled, as the user set it
      AUTH_DESC="auth disabled (RAY_AUTH_MODE=disabled)"
      return 0 ;;
    token) ;;
    *) die 2 "RAY_AUTH_MODE=$mode is not supported here: use token (the default) or disabled" ;;
  esac
  export RAY_AUTH_MODE=token
  if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
    [ "${#RAY_AUTH_TOKEN}" -ge "$NOPROP_MIN_TOKEN_CHARS" ] \
      || die 2 "RAY_AUTH_TOKEN has ${#RAY_AUTH_TOKEN} characters; use a random secret of at least $NOPROP_MIN_TOKEN_CHARS (e.g. \`openssl rand -hex 32\`)"
    AUTH_DESC="token auth on (token from RAY_AUTH_TOKEN)"
    return 0
  fi
  file="${TOKEN_FILE:-${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}}"
  if [ ! -e "$file" ]; then
    [ "$role" = head ] || die 2 "token auth is on but there is no token: copy the head's token file to $file (chmod 600), or export RAY_AUTH_TOKEN, or --token-file FILE; RAY_AUTH_MODE=disabled only if the cluster runs without auth"
    generate_token "$file"
  fi
  [ -f "$file" ] && [ -r "$file" ] || die 2 "token file $file is not a readable file"
  local mode_bits
  mode_bits="$(file_mode "$file")"
  (( (8#$mode_bits & 8#077) == 0 )) \
    || die 2 "token file $file can be read by other users (mode $mode_bits): chmod 600 $file"
  local chars
  chars="$(tr -d ' \t\r\n' < "$file" | wc -c | tr -d ' ')"
  [ "$chars" -ge "$NOPROP_MIN_TOKEN_CHARS" ] \
    || die 2 "token file $file holds $chars characters; it needs a random secret of at least $NOPROP_MIN_TOKEN_CHARS"
  export RAY_AUTH_TOKEN_PATH="$file"
  AUTH_FILE="$file"
  AUTH_ENV="RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$(printf %q "$file")"
  AUTH_DESC="token auth on (token file $file)"
}

# generate_token FILE: 256 random bits as 64 hex characters (Ray's own format), mode 0600.
generate_token() {
  local file="$1" dir tmp
  dir="$(dirname "$file")"
  if [ ! -d "$dir" ]; then
    (umask 077; mkdir -p "$dir") || die 1 "cannot create $dir for the token file"
  fi
  tmp="$(umask 077; mktemp "$dir/.auth_token.XXXXXX")" || die 1 "cannot write a token file in $dir"
  (umask 077; od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$tmp")
  chmod 600 "$tmp"
  mv "$tmp" "$file"
  note "generated a new Ray auth token in $file (mode 0600)"
}

is_loopback() { [[ "$1" == 127.* || "$1" == localhost || "$1" == ::1 ]]; }

# Pids of the node whose `ray start` runs as pid $1 in a session of its own: its session, and
# every descendant of it (a job's driver and its watcher start sessions of their own).
node_pids() {
  ps -eo pid=,ppid=,sid= | awk -v s="$1" '
    { pid[NR] = $1; ppid[NR] = $2; if ($3 == s) { keep[$1] = 1 } }
    END {
      do { added = 0
           for (i = 1; i <= NR; i++) if (!(pid[i] in keep) && (ppid[i] in keep)) { keep[pid[i]] = 1; added = 1 }
      } while (added)
      for (p in keep) print p
    }'
}

# 0 if pid $1 is the `ray start` of the node of temp dir $2.
is_node_process() {
  local cmd
  cmd="$(tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null)" || return 1
  [[ "$cmd" == *" start "* && "$cmd" == *" --temp-dir=$2 "* ]]
}

# end_node PID: SIGTERM the `ray start --block` of pid PID (it stops its own processes), wait up
# to 15 s for its session and descendants to end, SIGKILL what is left. Prints how many ended.
end_node() {
  local pid="$1" pids left="" i
  pids="$(node_pids "$pid" | sort -un | tr '\n' ' ')"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 30); do
    left="$(for p in $pids $(node_pids "$pid"); do kill -0 "$p" 2>/dev/null && echo "$p"; done; true)"
    [ -n "$left" ] || break
    sleep 0.5
  done
  if [ -n "$left" ]; then
    # shellcheck disable=SC2086
    kill -KILL $(echo "$left" | sort -un) 2>/dev/null || true
    sleep 0.5
  fi
  echo "$pids" | wc -w | tr -d ' '
}

stop_node() {
  local dir="$1" pidfile pid n
  pidfile="$dir/noprop_node.pid"
  [ -f "$pidfile" ] || die 1 "no node started by this script in $dir (no $pidfile); it stops only nodes it started"
  pid="$(cat "$pidfile")"
  [[ "$pid" =~ ^[0-9]+$ ]] || die 1 "$pidfile does not hold a pid"
  if ! is_node_process "$pid" "$dir" && [ -z "$(node_pids "$pid")" ]; then
    rm -f "$pidfile"
    note "the node of $dir (pid $pid) was not running"
    return 0
  fi
  n="$(end_node "$pid")"
  rm -f "$pidfile"
  note "stopped the node of $dir (pid $pid and $n processes)"
}

cluster_main() {
  local role="${1:-}"
  case "$role" in
    head|worker|stop) shift ;;
    -h|--help|help) cluster_usage; exit 0 ;;
    "") cluster_usage >&2; exit 2 ;;
    *) die 2 "unknown command '$role': use head, worker or stop (see --help)" ;;
  esac

  local address="" host="127.0.0.1" port=6379 dash_port=8265 num_cpus="" num_gpus="" resources=""
  local temp_dir="/tmp/ray" ports_base="" foreground=0 timeout_s=60 extra=()
  TOKEN_FILE=""
  while [ $# -gt 0 ]; do
    local opt="$1" val=""
    case "$opt" in
      -h|--help) cluster_usage; exit 0 ;;
      --foreground) foreground=1; shift; continue ;;
      --) shift; extra=("$@"); break ;;
      --*=*) val="${opt#*=}"; opt="${opt%%=*}"; shift ;;
      --*) [ $# -ge 2 ] || die 2 "$opt needs a value"; val="$2"; shift 2 ;;
      *) die 2 "unexpected argument '$opt' (see --help)" ;;
    esac
    case "$opt" in
      --address) address="$val" ;;
      --host) host="$val" ;;
      --port) port="$val" ;;
      --dashboard-port) dash_port="$val" ;;
      --num-cpus) num_cpus="$val" ;;
      --num-gpus) num_gpus="$val" ;;
      --resources) resources="$val" ;;
      --temp-dir) temp_dir="$val" ;;
      --ports-base) ports_base="$val" ;;
      --token-file) TOKEN_FILE="$val" ;;
      --timeout) timeout_s="$val" ;;
      *) die 2 "unknown option $opt (see --help)" ;;
    esac
  done
  for v in "$port" "$dash_port" "$timeout_s" ${ports_base:+"$ports_base"}; do
    [[ "$v" =~ ^[0-9]+$ ]] || die 2 "'$v' is not a whole number"
  done
  [ -z "$ports_base" ] || { [ "$ports_base" -ge 1024 ] && [ "$((ports_base + 99))" -le 65535 ]; } \
    || die 2 "--ports-base $ports_base: N..N+99 must lie within 1024..65535"
  temp_dir="${temp_dir%/}"
  [[ "$temp_dir" == /* ]] || temp_dir="$PWD/$temp_dir"

  if [ "$role" = stop ]; then
    stop_node "$temp_dir"
    return 0
  fi

  find_ray
  if [ "$role" = worker ]; then
    [ -n "$address" ] || die 2 "a worker needs --address HEAD:PORT, the head's GCS address that \`cluster.sh head\` printed"
    [[ "$address" != *://* ]] || die 2 "--address $address: give the head's GCS address HOST:PORT (6379 by default), not a URL"
    split_host_port "$address" || die 2 "--address $address is not HOST:PORT"
    tcp_open "$HP_HOST" "$HP_PORT" 5 \
      || die 3 "cannot reach the Ray head at $address: start it there with \`bash launch/cluster.sh head\`, check the address, and that port $HP_PORT is open from this machine"
  fi

  auth_setup "$role"
  if ! is_loopback "$host"; then
    [ "$RAY_AUTH_MODE" = token ] \
      || die 2 "--host $host opens the cluster to that network: token auth must be on (unset RAY_AUTH_MODE or set it to token)"
    note "warning: --host $host opens this node to $host's network; $AUTH_DESC; Ray's traffic is not encrypted, keep the cluster on a private network"
  elif [ "$RAY_AUTH_MODE" = disabled ]; then
    note "warning: auth disabled: Ray 2.60 listens on all interfaces for its GCS/raylet ports whatever --host says; only for machines whose ports nobody else reaches (tests, CI)"
  fi

  mkdir -p "$temp_dir" || die 1 "cannot create --temp-dir $temp_dir"
  local pidfile="$temp_dir/noprop_node.pid" log="$temp_dir/noprop_node.log"
  if [ -f "$pidfile" ] && is_node_process "$(cat "$pidfile")" "$temp_dir"; then
    die 1 "a node started by this script already runs with --temp-dir $temp_dir (pid $(cat "$pidfile")); stop it with \`bash launch/cluster.sh stop --temp-dir $temp_dir\` or use another --temp-dir"
  fi

  local args=(start --block --disable-usage-stats --temp-dir="$temp_dir")
  local check_ports=()
  case "$host" in
    0.0.0.0|::) ;;  # announce the address Ray detects
    *) args+=(--node-ip-address="$host") ;;
  esac
  if [ "$role" = head ]; then
    args+=(--head --port="$port" --dashboard-host="$host" --dashboard-port="$dash_port" --include-dashboard=true)
    check_ports+=("$port" "$dash_port")
  else
    args+=(--address="$address")
  fi
  [ -z "$num_cpus" ] || args+=(--num-cpus="$num_cpus")
  [ -z "$num_gpus" ] || args+=(--num-gpus="$num_gpus")
  [ -z "$resources" ] || args+=(--resources="$resources")
  if [ -n "$ports_base" ]; then
    local b="$ports_base"
    args+=(--node-manager-port=$((b)) --object-manager-port=$((b + 1))
           --dashboard-agent-listen-port=$((b + 2)) --dashboard-agent-grpc-port=$((b + 3))
           --runtime-env-agent-port=$((b + 4)) --metrics-export-port=$((b + 5))
           --min-worker-port=$((b + 10)) --max-worker-port=$((b + 99)))
    check_ports+=($((b)) $((b + 1)) $((b + 2)) $((b + 3)) $((b + 4)) $((b + 5)))
    if [ "$role" = head ]; then
      args+=(--ray-client-server-port=$((b + 6)))
      check_ports+=($((b + 6)))
    fi
  fi
  local p
  for p in "${check_ports[@]}"; do
    ! tcp_open 127.0.0.1 "$p" 1 \
      || die 1 "port $p is already in use on this machine (another Ray node?); choose other ports (--port, --dashboard-port, --ports-base)"
  done
  args+=("${extra[@]}")

  local announce="$host"
  case "$host" in 0.0.0.0|::) announce="$(hostname -I 2>/dev/null | awk '{print $1}')"; announce="${announce:-$host}" ;; esac
  note "$AUTH_DESC"
  if [ "$foreground" = 1 ]; then
    exec "$RAY" "${args[@]}"  # Ctrl-C or SIGTERM stops it; no pid file, `stop` is for detached nodes
  fi

  # Detached: its own session, so that `cluster.sh stop` (and a test) can find exactly its
  # processes by session id; Ray's workers stay in that session.
  : > "$log"  # emptied here, not by the child's redirection: the wait below must not read an old log
  setsid "$RAY" "${args[@]}" >> "$log" 2>&1 < /dev/null &
  local pid=$!
  echo "$pid" > "$pidfile"
  local deadline=$((SECONDS + timeout_s))
  until grep -q "Ray runtime started" "$log" 2>/dev/null; do
    if grep -qE "InvalidAuthToken|Unauthenticated" "$log" 2>/dev/null; then
      end_node "$pid" > /dev/null
      rm -f "$pidfile"
      die 3 "the head at $address refused this node ($AUTH_DESC): use the head's token (its token file copied here with mode 0600, --token-file, or RAY_AUTH_TOKEN) and RAY_AUTH_MODE=token (log: $log)"
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$pidfile"
      local why
      why="$(grep -E "Error|error|Exception|refused|failed|denied" "$log" | tail -n 1 | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-300)"
      die 1 "ray start exited before the node was up: ${why:-see $log} (log: $log)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      die 1 "the node did not come up within ${timeout_s} s (still starting as pid $pid; log: $log); stop it with \`bash launch/cluster.sh stop --temp-dir $temp_dir\`"
    fi
    sleep 0.3
  done

  if [ "$role" = head ]; then
    local token_hint=""
    local worker_base=$(( ${ports_base:-20900} + 100 )) submit_env=""
    if [ -n "$AUTH_FILE" ]; then
      token_hint=" --token-file $(printf %q "$AUTH_FILE")  (another machine: copy that file there first, mode 0600)"
    elif [ "$RAY_AUTH_MODE" = token ]; then
      token_hint=" (with the same RAY_AUTH_TOKEN in their environment)"
    else
      token_hint=" (with RAY_AUTH_MODE=disabled in their environment)"
    fi
    echo "head node up: pid $pid, GCS $announce:$port, dashboard and job API http://$announce:$dash_port"
    echo "  $AUTH_DESC"
    # submit.sh's default interpreter is this checkout's .venv python; else the one beside `ray`.
    [ -x "$NOPROP_REPO/.venv/bin/python" ] || submit_env=" NOPROP_PYTHON=$(printf %q "$(dirname "$RAY")/python")"
    echo "  add a worker:  bash launch/cluster.sh worker --address $announce:$port --temp-dir /tmp/ray-worker-1 --ports-base $worker_base$token_hint"
    echo "  submit a job:  RAY_ADDRESS=http://$announce:$dash_port $AUTH_ENV$submit_env bash launch/submit.sh --config demo --run-dir $(printf %q "$NOPROP_REPO/runs/job-demo")"
  else
    echo "worker node up: pid $pid, joined $address"
    echo "  $AUTH_DESC"
  fi
  echo "  log: $log"
  echo "  stop:          bash launch/cluster.sh stop --temp-dir $temp_dir"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  cluster_main "$@"
fi
