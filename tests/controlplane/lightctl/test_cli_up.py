"""`lightctl up` as a user runs it: real processes, each test in its own LIGHTPD_HOME,
and every process a test started (found by that LIGHTPD_HOME in its environment)
killed at its end, whether it passed or not. Each runs in a folder of its own, away
from the repository (where a user's shell would be, `cd /tmp && lightctl up`)."""

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from lightpd.controlplane.lightctl.embedded_redis import EmbeddedRedis, free_port

LIGHTCTL = os.path.join(os.path.dirname(sys.executable), "lightctl")
READY = "Press Ctrl-C"


def lightctl_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTPD_")}
    return {**env, "LIGHTPD_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def processes_of(home: Path) -> list[int]:
    """Live processes started with this LIGHTPD_HOME (a zombie has no environment)."""
    marker = f"LIGHTPD_HOME={home}\0".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:  # gone, or not ours
            continue
    return found


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat_file.parent.name)] = int(
                stat_file.read_text().rsplit(")", 1)[1].split()[1]
            )
        except (OSError, IndexError, ValueError):
            continue
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        children = {child for child, of in parents.items() if of == parent}
        found |= children
        todo.extend(children)
    return found


@pytest.fixture
def home(tmp_path):
    """A LIGHTPD_HOME for the test; what still runs with it at the end is killed."""
    home = tmp_path / "home"
    yield home
    for pid in processes_of(home):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def lightctl(home: Path, *args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [LIGHTCTL, *map(str, args)]
    return subprocess.run(
        command,
        env=lightctl_env(home),
        cwd=home.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Up:
    """A `lightctl up` in the background, its output read by a thread."""

    def __init__(
        self, home: Path, *args: object, nohup: bool = False, close_stdout: bool = False
    ) -> None:
        command = [LIGHTCTL, "up", *map(str, args)]
        # What `nohup lightctl up &` in a script does: SIGHUP by nohup, SIGINT by the shell.
        ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if nohup else None
        self.process = subprocess.Popen(
            ["nohup", *command] if nohup else command,
            env=lightctl_env(home),
            cwd=home.parent,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=ignore,
        )
        self.chunks: list[bytes] = []
        self._close_stdout = close_stdout
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        # Chunks, not lines: a step's line ends only once the step is done.
        while chunk := self.process.stdout.read1(4096):
            self.chunks.append(chunk)
            if self._close_stdout and READY in self.output:
                self.process.stdout.close()  # its next write meets a broken pipe
                return

    @property
    def output(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def wait_for(self, text: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert time.monotonic() < deadline, self.output
            assert self.process.poll() is None, self.output
            time.sleep(0.05)
        return self.output

    def wait_ready(self) -> str:
        return self.wait_for(READY)

    def stop(self, sig: signal.Signals = signal.SIGINT, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.reader.join(timeout=10)

    def __enter__(self) -> "Up":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def test_up_brings_the_fleet_up_answers_and_stops_on_ctrl_c(home):
    port = free_port()
    with Up(home, "--port", port) as up:
        output = up.wait_ready()
        assert f"OpenAI endpoint: http://127.0.0.1:{port}/v1" in output
        assert "curl http://127.0.0.1" in output
        assert re.search(r"Example answer \(\d+ tokens\)", output), output
        assert "random weights: its answers are gibberish" in output
        assert (home / "fleets" / str(port) / "fleet.json").is_file()
        assert up.stop() == 0, up.output
    assert "stopped." in up.output
    assert not (home / "fleets" / str(port) / "fleet.json").exists()
    assert processes_of(home) == []
    # Redis kept its data (API keys, history) in the fleet's folder, on disk, but
    # not the nodes, which left on purpose: the next `up` lists none of them as dead.
    with EmbeddedRedis(data_dir=home / "fleets" / str(port) / "redis") as kept:
        data = redis.Redis.from_url(kept.url)
        assert data.zcard("lightpd:requests") == 1  # the example request
        assert data.smembers("lightpd:nodes") == set()


def test_up_takes_a_model_dir_and_the_flags_of_vllm(home, tiny_model):
    port = free_port()
    args = ["--served-model-name", "tiny", "--api-key", "sk-1", "--max-model-len", "100"]
    with Up(home, tiny_model("llama"), "--port", port, "--prefill-nodes", "0", *args) as up:
        output = up.wait_ready()
        assert re.search(r"Example answer \(\d+ tokens\)", output), output  # sent with the key
        assert "-H 'Authorization: Bearer sk-1'" in output
        assert "gibberish" not in output  # the user's own model
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-1"})
        assert [m["id"] for m in models.json()["data"]] == ["tiny"]
        listing = lightctl(home, "node", "list")  # the only fleet running: found alone
        assert listing.returncode == 0 and "decode" in listing.stdout, listing.stderr
        saved = json.loads((home / "fleets" / str(port) / "fleet.json").read_text())
        nodes = httpx.get(
            f"{url}/admin/nodes", headers={"Authorization": f"Bearer {saved['admin_token']}"}
        ).json()
        assert [node["max_model_len"] for node in nodes] == [100]
        assert up.stop() == 0, up.output
    assert processes_of(home) == []


def test_up_refuses_a_fleet_without_decode_nodes_before_starting_anything(home):
    for option, value, message in (
        ("--decode-nodes", "0", "--decode-nodes must be at least 1"),
        ("--prefill-nodes", "-1", "--prefill-nodes must be 0 or more"),
    ):
        run = lightctl(home, "up", "--port", free_port(), option, value, timeout=60)
        assert run.returncode == 2 and message in run.stderr, run.stderr
        assert "Starting" not in run.stdout
    assert not home.exists()  # no model written, no fleet folder


def test_a_second_up_on_a_busy_port_fails_and_leaves_the_first_fleet_alone(
    home, tmp_path, tiny_model
):
    port = free_port()
    model = tiny_model("llama")
    fleet = ["--prefill-nodes", "0", "--no-example"]
    with Up(home, model, "--port", port, *fleet) as first:
        first.wait_ready()
        state_file = home / "fleets" / str(port) / "fleet.json"
        saved = state_file.read_text()
        # The same home (its lock), then another (the port itself): both stop before
        # starting anything, with one line that says why.
        for other_home, cause in (
            (home, f"error: port {port} is in use by another lightctl up"),
            (tmp_path / "other", f"error: port {port} is in use (another lightctl up?)"),
        ):
            second = lightctl(other_home, "up", model, "--port", port, *fleet, timeout=60)
            assert second.returncode != 0
            assert second.stderr.startswith(cause) and second.stderr.count("\n") == 1, second
            assert "Starting" not in second.stdout
        assert state_file.read_text() == saved
        tokens = json.loads(saved)
        url = f"http://127.0.0.1:{port}"
        nodes = httpx.get(
            f"{url}/admin/nodes", headers={"Authorization": f"Bearer {tokens['admin_token']}"}
        )
        assert nodes.status_code == 200 and [n["status"] for n in nodes.json()] == ["ready"]
        body = {"model": Path(model).name, "prompt": "Hello", "max_tokens": 4}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200

        # A fleet on another port runs beside it, in its own folder; lightctl then
        # asks which fleet a command is for.
        other_port = free_port()
        with Up(home, model, "--port", other_port, *fleet) as second:
            second.wait_ready()
            listing = lightctl(home, "node", "list")
            assert listing.returncode != 0 and "2 fleets run here" in listing.stderr
            listing = lightctl(home, "node", "list", "--control-plane", other_port)
            assert listing.returncode == 0 and "decode" in listing.stdout, listing.stderr
            assert second.stop() == 0, second.output
        assert state_file.read_text() == saved
        assert first.process.poll() is None
        assert first.stop() == 0, first.output
    assert processes_of(home) == []


@pytest.mark.parametrize(
    ("sig", "close_stdout"),
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGINT", "SIGTERM", "SIGINT-stdout-closed"],
)
def test_up_under_nohup_stops_every_process_it_started(home, tiny_model, sig, close_stdout):
    port = free_port()
    args = [tiny_model("llama"), "--port", port, "--prefill-nodes", "0", "--no-example"]
    with Up(home, *args, nohup=True, close_stdout=close_stdout) as up:
        up.wait_ready()
        children = descendants(up.process.pid)
        assert len(children) >= 3, children  # Redis, the control plane, a node
        if close_stdout:
            up.reader.join(timeout=10)
        assert up.stop(sig) == 0, up.output
    assert [pid for pid in children if is_alive(pid)] == []
    assert processes_of(home) == []
    assert not (home / "fleets" / str(port) / "fleet.json").exists()


@pytest.mark.parametrize("step", ["starting the control plane", "starting decode node 0"])
def test_a_signal_while_the_fleet_starts_stops_what_started(home, tiny_model, step):
    args = [tiny_model("llama"), "--port", free_port(), "--prefill-nodes", "0"]
    with Up(home, *args) as up:
        up.wait_for(step)
        assert up.stop(signal.SIGTERM) == 0, up.output
    assert "SIGTERM received" in up.output and "stopped." in up.output
    assert processes_of(home) == []


def test_up_with_an_unsupported_model_prints_the_nodes_reason(home, tmp_path, tiny_model):
    model = tmp_path / "gpt2"
    subprocess.run(["cp", "-r", tiny_model("llama"), str(model)], check=True)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(config))
    port = free_port()
    run = lightctl(home, "up", model, "--port", port, "--prefill-nodes", "0", timeout=120)
    assert run.returncode != 0
    assert "error: the decode node 0 did not start" in run.stderr, run.stderr
    assert "architecture 'GPT2LMHeadModel' is not supported" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert "stopped." in run.stdout
    assert processes_of(home) == []
    assert not (home / "fleets" / str(port) / "fleet.json").exists()


def test_the_fleets_redis_is_locked_and_keeps_no_key_in_the_clear(home, tiny_model):
    """The embedded Redis asks for a password (from the cluster token), keeps its
    folder to its owner, and API keys live in it as salted hashes only: keys an older
    version kept in the clear are moved at start and the append-only file rewritten."""
    port = free_port()
    data_dir = home / "fleets" / str(port) / "redis"
    with EmbeddedRedis(data_dir=data_dir) as old:  # as an older lightctl up left it
        redis.Redis.from_url(old.url).sadd("lightpd:api_keys", "sk-kept-in-the-clear")
    (data_dir).chmod(0o755)
    args = [tiny_model("llama"), "--port", port, "--prefill-nodes", "0", "--no-example"]
    with Up(home, *args) as up:
        up.wait_ready()
        url = f"http://127.0.0.1:{port}"
        saved = json.loads((home / "fleets" / str(port) / "fleet.json").read_text())
        admin = {"Authorization": f"Bearer {saved['admin_token']}"}
        made = httpx.post(f"{url}/admin/api-keys", headers=admin).json()
        for key in ("sk-kept-in-the-clear", made["api_key"]):
            reply = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert reply.status_code == 200, key
        assert (
            httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-evil"}).status_code
            == 401
        )
        listed = httpx.get(f"{url}/admin/api-keys", headers=admin).json()
        assert {k["prefix"] for k in listed} == {"sk-kept", made["api_key"][:7]}
        assert made["api_key"] not in json.dumps(listed)
        # Strangers on this machine: no password, no data; and the folder is not theirs.
        redis_url = _redis_url_of(home)
        assert redis_url.startswith("redis://:")  # with a password
        stranger = redis.Redis(
            port=redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]
        )
        with pytest.raises(redis.AuthenticationError):
            stranger.sadd("lightpd:api_key_hashes", "sk-evil")
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        deadline = time.monotonic() + 20
        while True:  # the append-only file is rewritten in the background
            on_disk = b"".join(p.read_bytes() for p in data_dir.rglob("*") if p.is_file())
            if b"sk-kept-in-the-clear" not in on_disk or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert b"sk-kept-in-the-clear" not in on_disk
        assert made["api_key"].encode() not in on_disk
        for path in data_dir.rglob("*"):
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
        assert up.stop() == 0, up.output


def _redis_url_of(home: Path) -> str:
    """The embedded Redis's URL, from the control plane's environment."""
    for pid in processes_of(home):
        with contextlib.suppress(OSError):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            for entry in environ:
                if entry.startswith(b"LIGHTPD_REDIS_URL="):
                    return entry.split(b"=", 1)[1].decode()
    raise AssertionError("no process has LIGHTPD_REDIS_URL")
