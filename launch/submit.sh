#!/usr/bin/env bash
# Submit a noprop_dist training job to a running Ray cluster with `ray job submit`, follow its
# logs and exit with its status. `bash launch/submit.sh --help` tells everything.
#   RAY_ADDRESS=http://HEAD:8265 bash launch/submit.sh --config mnist --run-dir /shared/runs/mnist-1
set -euo pipefail
# shellcheck source=launch/cluster.sh
source "$(dirname "${BASH_SOURCE[0]}")/cluster.sh"

submit_usage() {
  cat <<'EOF'
Usage: RAY_ADDRESS=http://HEAD:8265 bash launch/submit.sh [SUBMIT OPTIONS] [--] TRAIN ARGS...

Uploads this repository as the job's working directory and runs `noprop-dist train --address
auto TRAIN ARGS...` as a Ray job on the cluster's head node. It waits until the cluster's job
agent takes the job (a fresh head refuses jobs for a few seconds), prints the job id, follows
the job's logs and exits with the job's status.

Submit options (anywhere before a `--`; everything else goes to `noprop-dist train`):
  --address URL        the cluster's dashboard / job API (default $RAY_ADDRESS), e.g.
                       http://127.0.0.1:8265; host:port means http://host:port
  --wait-timeout S     how long to wait for the job agent (default 120)
  --submission-id ID   the job id (default noprop-<date>-<time>-<random>)
  --no-follow          return once the job is submitted (exit 0) instead of following it
  --token-file FILE    the cluster's token file (default $RAY_AUTH_TOKEN_PATH, else
                       ~/.ray/auth_token); or export RAY_AUTH_TOKEN
  -h, --help           this text

TRAIN ARGS: e.g. --config mnist --run-dir /abs/path/run --train.lr=3e-4. The run directory is
written by the job's driver on the head node: give an absolute path there (a relative one would
land in the job's temporary working directory and is refused).

Environment: RAY_ADDRESS; NOPROP_PYTHON, the interpreter on the cluster's nodes that has
noprop_dist's dependencies (default: this checkout's .venv/bin/python, which `bash
launch/setup.sh` makes, when it exists, else `python`); RAY_AUTH_MODE (token by default, or disabled,
as the cluster runs), RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH; RAY_BIN.

Exit status: 0 the job SUCCEEDED (or was submitted, with --no-follow); 1 it FAILED or was
STOPPED; 2 bad arguments or missing token; 3 the cluster cannot be reached, refused the token,
or had no job agent ready within --wait-timeout; 130 interrupted (the job keeps running).
EOF
}

strip_colors() { sed 's/\x1b\[[0-9;]*m//g'; }

# The last line of ray's output that says what went wrong, without colours and log prefixes.
error_line() {
  strip_colors | grep -E "Error|error|Exception|refused|failed|Failed|denied|Unauthorized|Forbidden" \
    | grep -v "^ *File \"" | tail -n 1 | sed -E 's/^[0-9-]+ [0-9:,]+\s+[A-Z]+ [a-z_.]+:[0-9]+ -- //' | cut -c1-400
}

submit_main() {
  local address="${RAY_ADDRESS:-}" wait_timeout=120 submission_id="" follow=1 train=()
  TOKEN_FILE=""
  while [ $# -gt 0 ]; do
    case "$1" in
      -h|--help) submit_usage; exit 0 ;;
      --) shift; train+=("$@"); break ;;
      --no-follow) follow=0; shift ;;
      --address|--wait-timeout|--submission-id|--token-file)
        [ $# -ge 2 ] || die 2 "$1 needs a value"
        case "$1" in
          --address) address="$2" ;; --wait-timeout) wait_timeout="$2" ;;
          --submission-id) submission_id="$2" ;; --token-file) TOKEN_FILE="$2" ;;
        esac
        shift 2 ;;
      --address=*) address="${1#*=}"; shift ;;
      --wait-timeout=*) wait_timeout="${1#*=}"; shift ;;
      --submission-id=*) submission_id="${1#*=}"; shift ;;
      --token-file=*) TOKEN_FILE="${1#*=}"; shift ;;
      *) train+=("$1"); shift ;;
    esac
  done
  [[ "$wait_timeout" =~ ^[0-9]+$ ]] || die 2 "--wait-timeout $wait_timeout is not a whole number of seconds"
  [ -n "$address" ] || die 2 "no cluster address: set RAY_ADDRESS=http://HEAD:8265 (the head's dashboard / job API) or pass --address"
  case "$address" in
    http://*|https://*) ;;
    *://*) die 2 "--address $address: give the dashboard / job API URL http://HOST:PORT (8265 by default)" ;;
    *) address="http://$address" ;;
  esac
  address="${address%/}"
  local hostport="${address#*://}"
  hostport="${hostport%%/*}"
  if [[ "$hostport" != *:* || "$hostport" == *] ]]; then  # no port: the scheme's
    if [[ "$address" == https://* ]]; then hostport="$hostport:443"; else hostport="$hostport:80"; fi
  fi
  split_host_port "$hostport" || die 2 "cannot read HOST:PORT from the cluster address $address"

  # The run directory is on the head; a relative path would be inside the job's working dir.
  local i a run_dir_given=0
  for ((i = 0; i < ${#train[@]}; i++)); do
    a="${train[$i]}"
    case "$a" in
      --run-dir=*|--resume=*) a="${a#*=}" ;;
      --run-dir|--resume) a="${train[$((i + 1))]:-}" ;;
      *) continue ;;
    esac
    run_dir_given=1
    [[ "$a" == /* ]] || die 2 "run directory '$a' is relative: the job runs in a temporary directory on the head, give an absolute path there"
  done
  [ "$run_dir_given" = 1 ] || note "warning: no --run-dir: the run goes to runs/ inside the job's temporary working directory on the head; pass --run-dir /abs/path to keep it"

  find_ray
  auth_setup client
  tcp_open "$HP_HOST" "$HP_PORT" 3 \
    || die 3 "cannot reach the Ray job API at $address: start a head with \`bash launch/cluster.sh head\` (job API on port 8265) or set RAY_ADDRESS to its http://HOST:PORT"

  submission_id="${submission_id:-noprop-$(date +%Y%m%d-%H%M%S)-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')}"
  # The interpreter of the job: NOPROP_PYTHON, else the one `bash launch/setup.sh` made here
  # (the same path on the head when the checkout is), else `python` on the head's PATH.
  local py="${NOPROP_PYTHON:-}"
  if [ -z "$py" ]; then
    if [ -x "$NOPROP_REPO/.venv/bin/python" ]; then py="$NOPROP_REPO/.venv/bin/python"; else py=python; fi
  fi
  local runtime_env='{"excludes": [".venv", "runs", "data", ".git", ".pytest_cache", "__pycache__", "*.egg-info", "benchmarks/results"]}'
  local submit=("$RAY" job submit --address "$address" --submission-id "$submission_id" --no-wait
                --log-style record --log-color false
                --working-dir "$NOPROP_REPO" --runtime-env-json "$runtime_env"
                -- "$py" launch/job.py train --address auto "${train[@]}")

  # A fresh head answers "No available agent to submit job" until its job agent is up (each
  # such answer takes the head up to 10 s): retry with the same submission id until the
  # deadline. An attempt that reached the head despite an error makes the next one find the
  # id taken: that job is ours.
  local deadline=$((SECONDS + wait_timeout)) attempt=0 out rc waited=0 started=$SECONDS
  while true; do
    attempt=$((attempt + 1))
    rc=0
    out="$("${submit[@]}" 2>&1)" || rc=$?
    [ "$rc" = 0 ] && break
    if [ "$attempt" -gt 1 ] && grep -qi "already exists" <<<"$out"; then
      break
    fi
    if grep -qE "AuthenticationError|Unauthorized|Forbidden|Invalid authentication token" <<<"$out"; then
      die 3 "the cluster at $address refused the request: $(error_line <<<"$out"); use the cluster's token (RAY_AUTH_TOKEN or the token file) and the same RAY_AUTH_MODE as its nodes"
    fi
    if grep -qE "No available agent|Failed to get head node agent|Head node id has not yet been persisted|Connection refused|Cannot connect to host|ServerDisconnected|ClientConnectorError|Connection reset" <<<"$out"; then
      if [ "$SECONDS" -ge "$deadline" ]; then
        die 3 "the cluster at $address had no job agent ready within ${wait_timeout} s ($(error_line <<<"$out")); check \`ray status\` and the head's logs (dashboard_agent.log), or raise --wait-timeout"
      fi
      if [ "$waited" = 0 ]; then
        note "the cluster's job agent is not ready yet; retrying for up to ${wait_timeout} s"
        waited=1
      fi
      sleep 1
      continue
    fi
    strip_colors <<<"$out" >&2
    die 3 "ray job submit failed: $(error_line <<<"$out")"
  done
  echo "submitted job $submission_id to $address ($((SECONDS - started)) s, attempt $attempt)"
  local ray_cmd="$AUTH_ENV $(printf %q "$RAY") job"
  local logs_cmd="$ray_cmd logs --address $address $submission_id"
  if [ "$follow" = 0 ]; then
    echo "  logs:   $logs_cmd --follow"
    echo "  status: $ray_cmd status --address $address $submission_id"
    echo "  stop:   $ray_cmd stop --address $address $submission_id"
    return 0
  fi

  trap 'echo; note "interrupted: job $submission_id keeps running on the cluster; stop it with: $ray_cmd stop --address $address $submission_id"; exit 130' INT
  "$RAY" job logs --address "$address" --follow --log-style record --log-color false "$submission_id" \
    || note "the log stream of job $submission_id ended with an error; asking for its status"

  # The status, once terminal (the log stream can end early when its connection drops).
  local status_out status="" msg
  while true; do
    status_out="$("$RAY" job status --address "$address" --log-style record --log-color false "$submission_id" 2>&1 | strip_colors)" || true
    case "$status_out" in
      *"Job '$submission_id' succeeded"*) status=SUCCEEDED ;;
      *"Job '$submission_id' failed"*) status=FAILED ;;
      *"Job '$submission_id' was stopped"*|*"Job '$submission_id' stopped"*) status=STOPPED ;;
      *"Status for job '$submission_id': "*) status="$(sed -nE "s/.*Status for job '$submission_id': (JobStatus\.)?([A-Z]+).*/\2/p" <<<"$status_out" | tail -n 1)" ;;
      *) die 3 "cannot read the status of job $submission_id: $(error_line <<<"$status_out"); try: $ray_cmd status --address $address $submission_id" ;;
    esac
    case "$status" in
      SUCCEEDED|FAILED|STOPPED) break ;;
    esac
    sleep 2
  done
  trap - INT
  if [ "$status" = SUCCEEDED ]; then
    echo "job $submission_id SUCCEEDED"
    return 0
  fi
  msg="$(sed -n 's/.*Status message: //p' <<<"$status_out" | tail -n 1 | cut -c1-300)"
  if [ "$status" = FAILED ]; then  # the job's own one-line error, if it printed one, says the fix
    local logs why
    logs="$("$RAY" job logs --address "$address" --log-style record --log-color false "$submission_id" 2>&1 | strip_colors)" || true
    why="$(grep -oE "noprop-dist( job)?: error: .*" <<<"$logs" | tail -n 1 | cut -c1-400)" || true
    # The shell's own words for a missing interpreter ("sh: 1: python: not found"), not any
    # traceback that mentions a python path and a missing file.
    if [ -z "$why" ] && grep -qF -e "$py: not found" -e "$py: command not found" -e "$py: No such file or directory" <<<"$logs"; then
      why="the head has no $py: run \`bash launch/setup.sh\` there and submit with NOPROP_PYTHON=/path/to/checkout/.venv/bin/python"
    fi
    msg="${why:-$msg}"
  fi
  echo "$(basename "$0"): job $submission_id $status${msg:+: $msg}; its logs: $logs_cmd" >&2
  return 1
}

submit_main "$@"
