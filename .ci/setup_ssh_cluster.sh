#!/usr/bin/env bash
# SSH to loopback for the cluster-launcher test (`ray up/submit/down` with the `local` provider on
# this one machine). Needs root. Idempotent: safe to run again while the sshd it started runs.
#
#   .ci/setup_ssh_cluster.sh start VENV_BIN   # prints KEY=VALUE lines (user, key, state dir)
#   .ci/setup_ssh_cluster.sh stop             # stops the sshd this script started
#
# What `start` does:
#   1. installs openssh-server and rsync from Debian's packages when missing (apt-get);
#   2. creates the user $RAYFED_SSH_USER (default rayfedci) with an unlocked, password-less account
#      (`usermod -p '*'`: sshd refuses a locked `useradd` account even for key logins);
#   3. writes a key pair under $RAYFED_SSH_STATE (default /tmp/rayfed-ssh) and authorizes it;
#   4. writes the user's ~/.bashrc so that VENV_BIN (its `python` and `ray`) comes first on PATH
#      (Ray runs remote commands through `bash --login -i`) and Ray's files go to the user's own
#      RAY_TMPDIR (never the /tmp/ray of other Ray instances on this machine);
#   5. grants the user traverse (o+x) permission on the folders above VENV_BIN when it lacks it;
#   6. starts an sshd on 127.0.0.1:22 only (key auth only, only that user), with its own config
#      and host key under the state dir, and checks a login runs `python -c 'import rayfed'`.
set -euo pipefail

STATE=${RAYFED_SSH_STATE:-/tmp/rayfed-ssh}
USER_NAME=${RAYFED_SSH_USER:-rayfedci}
PORT=22

die() { echo "setup_ssh_cluster: $*" >&2; exit 3; }

stop() {
  if [[ -f "$STATE/sshd.pid" ]]; then
    pid=$(cat "$STATE/sshd.pid")
    if kill -0 "$pid" 2>/dev/null; then kill "$pid"; fi
    rm -f "$STATE/sshd.pid"
  fi
}

start() {
  local venv_bin=${1:?usage: $0 start VENV_BIN}
  venv_bin=$(cd "$venv_bin" && pwd)
  [[ -x "$venv_bin/python" && -x "$venv_bin/ray" ]] || die "$venv_bin has no python and ray"
  [[ $(id -u) -eq 0 ]] || die "must run as root (creates a user, starts sshd)"

  if ! command -v rsync >/dev/null || [[ ! -x /usr/sbin/sshd ]]; then
    command -v apt-get >/dev/null || die "openssh-server/rsync missing and no apt-get to install them"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends openssh-server openssh-client rsync >/dev/null
  fi

  mkdir -p "$STATE" /run/sshd
  chmod 755 "$STATE"
  if ! id "$USER_NAME" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash "$USER_NAME"
  fi
  usermod -p '*' "$USER_NAME"
  local home
  home=$(getent passwd "$USER_NAME" | cut -d: -f6)

  [[ -f "$STATE/id_ed25519" ]] || ssh-keygen -q -t ed25519 -N '' -C rayfed-ci -f "$STATE/id_ed25519"
  [[ -f "$STATE/ssh_host_ed25519_key" ]] || ssh-keygen -q -t ed25519 -N '' -f "$STATE/ssh_host_ed25519_key"
  install -d -m 700 -o "$USER_NAME" -g "$USER_NAME" "$home/.ssh"
  install -m 600 -o "$USER_NAME" -g "$USER_NAME" "$STATE/id_ed25519.pub" "$home/.ssh/authorized_keys"

  local ray_tmp="/tmp/ray-$USER_NAME"
  install -d -m 700 -o "$USER_NAME" -g "$USER_NAME" "$ray_tmp"
  cat > "$home/.bashrc" <<EOF
# written by rayfed's .ci/setup_ssh_cluster.sh
export PATH="$venv_bin:\$PATH"
export RAY_TMPDIR="$ray_tmp"
export RAY_USAGE_STATS_ENABLED=0
export HF_HUB_OFFLINE=1
EOF
  cp "$home/.bashrc" "$home/.profile"
  chown "$USER_NAME:$USER_NAME" "$home/.bashrc" "$home/.profile"

  # the user must reach the virtualenv, the interpreter it links to (e.g. under /root/.pyenv) and,
  # for an editable install, the checkout
  local target d part
  for target in "$venv_bin/python" "$(readlink -f "$venv_bin/python")" "$(cd "$venv_bin/../.." && pwd)/x"; do
    d=""
    IFS=/ read -ra parts <<< "$(dirname "$target")"
    for part in "${parts[@]}"; do  # top-down, so only the folders that block are changed
      [[ -z "$part" ]] && continue
      d="$d/$part"
      if ! su "$USER_NAME" -s /bin/sh -c "test -x '$d'"; then
        chmod o+x "$d"
        echo "setup_ssh_cluster: granted o+x on $d" >&2
      fi
    done
  done

  cat > "$STATE/sshd_config" <<EOF
Port $PORT
ListenAddress 127.0.0.1
HostKey $STATE/ssh_host_ed25519_key
PidFile $STATE/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AllowUsers $USER_NAME
UsePAM no
X11Forwarding no
AllowTcpForwarding yes
MaxStartups 50:30:100
MaxSessions 50
EOF
  if [[ -f "$STATE/sshd.pid" ]] && kill -0 "$(cat "$STATE/sshd.pid")" 2>/dev/null; then
    :  # already running
  else
    if (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then
      die "127.0.0.1:$PORT is already taken by another process; stop it or run this test elsewhere"
    fi
    /usr/sbin/sshd -f "$STATE/sshd_config" -E "$STATE/sshd.log"
    for _ in $(seq 50); do [[ -f "$STATE/sshd.pid" ]] && break; sleep 0.1; done
  fi

  local out
  out=$(ssh -i "$STATE/id_ed25519" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        -o BatchMode=yes -o ConnectTimeout=10 "$USER_NAME@127.0.0.1" \
        "bash --login -c -i 'source ~/.bashrc; command -v python; command -v ray; python -c \"import rayfed, torch\" && echo IMPORT_OK'" 2>&1) \
    || die "ssh login failed: $out (see $STATE/sshd.log)"
  [[ "$out" == *IMPORT_OK* ]] || die "rayfed does not import over ssh: $out"
  [[ "$out" == *"$venv_bin/python"* ]] || die "python over ssh is not $venv_bin/python: $out"

  echo "RAYFED_SSH_USER=$USER_NAME"
  echo "RAYFED_SSH_KEY=$STATE/id_ed25519"
  echo "RAYFED_SSH_STATE=$STATE"
  echo "RAYFED_SSH_HOME=$home"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  *) echo "usage: $0 start VENV_BIN | stop" >&2; exit 2 ;;
esac
