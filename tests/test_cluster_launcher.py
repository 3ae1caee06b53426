"""cluster.yaml and job submission: Ray's own validator, a real `ray up/submit/down` over SSH to
loopback, and `ray job submit` to a local `ray start --head` (separate ports from the session's Ray).

The SSH test needs root (it creates the user `rayfedci` and starts an sshd on 127.0.0.1:22 with
.ci/setup_ssh_cluster.sh, installing openssh-server and rsync with apt-get when missing); it skips,
saying why, only when it is not root. Neither test uses the session's Ray.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env() -> dict:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return env


def _run(args: list[str], timeout: float, env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env={**_env(), **(env_extra or {})},
                          **kw)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-4000:]}"
    return proc


def test_cluster_yaml_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    assert raw["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"] == "HEAD_IP" and raw["provider"]["worker_ips"][0] == "WORKER_IP_1"
    assert raw["max_workers"] == len(raw["provider"]["worker_ips"])
    setup = " ".join(raw["setup_commands"])
    assert ".ci/constraints.txt" in setup and "~/rayfed-pfl" in setup  # CPU torch constraint, this repo
    assert raw["file_mounts"] == {"~/rayfed-pfl": "."}
    assert (ROOT / ".ci" / "constraints.txt").read_text().strip().startswith("torch==")
    # the loopback variant the end-to-end test runs is valid too
    validate_config(prepare_config(_loopback_config("rayfed-x", "u", "/k", _free_ports(4))))
    broken = copy.deepcopy(raw)
    broken["provider"]["head_ips"] = broken["provider"].pop("head_ip")
    with pytest.raises(Exception):  # noqa: B017 - Ray raises jsonschema's or its own error
        validate_config(prepare_config(broken))


def _loopback_config(name: str, user: str, key: str, ports: list[int]) -> dict:
    """cluster.yaml pointed at this machine: same file mounts and rsync rules; the setup only checks
    the environment (the test must not download torch); Ray on its own ports."""
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg["cluster_name"] = name
    cfg["provider"] = {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    cfg["auth"] = {"ssh_user": user, "ssh_private_key": key}
    cfg["max_workers"] = 0
    cfg["setup_commands"] = ["command -v ray && python -c 'import importlib.util as u; assert u.find_spec(\"rayfed\")'"]
    p = ports
    cfg["head_start_ray_commands"] = [
        "ray stop",  # runs as the ssh user: stops only that user's Ray
        f"ray start --head --port={p[0]} --ray-client-server-port={p[1]} --dashboard-port={p[2]} "
        f"--dashboard-agent-listen-port={p[3]} --include-dashboard=false --num-cpus=2 "
        "--autoscaling-config=~/ray_bootstrap_config.yaml --disable-usage-stats"]
    cfg["worker_start_ray_commands"] = []
    return cfg


@pytest.fixture(scope="module")
def ssh_loopback():
    """A user reachable over SSH on 127.0.0.1 with this virtualenv first on its PATH."""
    if os.geteuid() != 0:
        pytest.skip("the SSH cluster test needs root: it creates a user and starts an sshd on 127.0.0.1 "
                    "(.ci/setup_ssh_cluster.sh); run the suite as root, as CI does")
    script = ROOT / ".ci" / "setup_ssh_cluster.sh"
    proc = subprocess.run(["bash", str(script), "start", str(VENV_BIN)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"SSH setup failed:\n{proc.stdout}\n{proc.stderr}"
    info = dict(line.split("=", 1) for line in proc.stdout.split() if "=" in line)
    yield info
    subprocess.run(["bash", str(script), "stop"], capture_output=True, timeout=60)


def _user_pids(user: str) -> dict[int, str]:
    out = subprocess.run(["ps", "-u", user, "-o", "pid=,comm="], capture_output=True, text=True).stdout
    return {int(line.split()[0]): line.split()[1] for line in out.strip().splitlines() if line.strip()}


@pytest.mark.slow
def test_ray_up_submit_down_over_ssh_to_loopback(ssh_loopback, tmp_path):
    user, home = ssh_loopback["RAYFED_SSH_USER"], Path(ssh_loopback["RAYFED_SSH_HOME"])
    name = f"rayfed-ci-{uuid.uuid4().hex[:6]}"
    conf = tmp_path / "cluster.yaml"
    conf.write_text(yaml.safe_dump(_loopback_config(name, user, ssh_loopback["RAYFED_SSH_KEY"], _free_ports(4))))
    runs = home / "runs"
    before = set(runs.iterdir()) if runs.exists() else set()
    launcher = {"RAY_TMPDIR": str(tmp_path)}  # the local provider's cluster state stays in tmp_path
    try:
        _run([RAY, "up", "-y", "--no-config-cache", str(conf)], timeout=400, cwd=ROOT, env_extra=launcher)
        assert (home / "rayfed-pfl" / "examples" / "quickstart.yaml").exists()  # file_mounts synced
        assert not (home / "rayfed-pfl" / ".venv").exists()  # rsync_exclude applied
        sub = _run([RAY, "submit", str(conf), "rayfed/submit.py", "--", "run",
                    "rayfed-pfl/examples/quickstart.yaml", "--set", "rounds=2",
                    "--set", "output.progress=false"], timeout=400, cwd=ROOT, env_extra=launcher)
        assert "rayfed.submit: connected to auto (1 node(s)" in sub.stdout
        assert "client-mean acc" in sub.stdout and "run directory:" in sub.stdout
        (new,) = set(runs.iterdir()) - before
        summary = json.loads((new / "summary.json").read_text())
        assert summary["algorithm"] == "fedper" and summary["rounds"] == 2 and summary["accuracy_mean"] > 0.1
        alive = set(_user_pids(user).values())
        assert {"gcs_server", "raylet"} <= alive  # the entry script left the cluster running
    finally:
        down = subprocess.run([RAY, "down", "-y", str(conf)], capture_output=True, text=True, timeout=300,
                              env={**_env(), **launcher}, cwd=ROOT)
        for pid, comm in _user_pids(user).items():  # only the dedicated user's leftovers, by pid
            if comm != "sshd":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for cache in Path("/tmp").glob("ray-config-*"):  # the launcher's cached copy of this config
            with contextlib.suppress(OSError, UnicodeDecodeError):
                if name in cache.read_text():
                    cache.unlink()
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]


@pytest.mark.slow
def test_ray_job_submit_to_a_local_head(tmp_path):
    ports = _free_ports(5)
    temp_dir = Path(f"/tmp/rf-job-{uuid.uuid4().hex[:6]}")  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={ports[0]}", f"--ray-client-server-port={ports[1]}",
         f"--dashboard-port={ports[2]}", f"--dashboard-agent-listen-port={ports[3]}",
         f"--metrics-export-port={ports[4]}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, env={**_env(), "RAY_TMPDIR": str(temp_dir)},
        start_new_session=True)
    address = f"http://127.0.0.1:{ports[2]}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except OSError:
                assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
                assert time.time() < deadline, "the head's dashboard did not come up"
                time.sleep(0.5)
        wd = tmp_path / "job"
        wd.mkdir()
        out_dir = tmp_path / "runs"
        (wd / "config.yaml").write_text(yaml.safe_dump({
            "seed": 0, "rounds": 2,
            "data": {"source": "synthetic", "num_clients": 6,
                     "synthetic": {"num_samples": 360, "num_classes": 4, "feature_shape": [8]}},
            "model": {"name": "mlp", "mlp_hidden": [16]},
            "train": {"lr": 0.01, "batch_size": 16},
            "algorithm": {"name": "fedper"},
            "runtime": {"executor": "ray", "num_actors": 2, "num_cpus_per_actor": 0.5, "torch_threads": 1},
            "output": {"dir": str(out_dir), "plots": False, "progress": False, "save_final": False}}))
        job = _run([RAY, "job", "submit", "--address", address, "--working-dir", str(wd), "--",
                    "python", "-m", "rayfed.submit", "run", "config.yaml"], timeout=400,
                   env_extra={"RAY_TMPDIR": str(temp_dir)})
        assert "succeeded" in job.stdout + job.stderr
        assert f":{ports[0]} (1 node(s), 2 CPUs)" in job.stdout  # RAY_ADDRESS from the job: this head
        (run_dir,) = list(out_dir.iterdir())
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["algorithm"] == "fedper" and summary["accuracy_mean"] > 0.25
        urllib.request.urlopen(f"{address}/api/version", timeout=5).read()  # the head outlived the job
    finally:
        head.send_signal(signal.SIGINT)  # `ray start --block` stops what it started (nothing else)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(30)
        # processes of this head only (their command lines name its temp dir), by pid
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if str(temp_dir).encode() in (d / "cmdline").read_bytes():
                        os.kill(int(d.name), signal.SIGKILL)
                except OSError:
                    pass
        shutil.rmtree(temp_dir, ignore_errors=True)
