"""lightctl as a user runs it."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import redis

from controlplane.embedded_redis import EmbeddedRedis, free_port

LIGHTCTL = os.path.join(os.path.dirname(sys.executable), "lightctl")


def test_model_tiny_then_generate_prints_text(tmp_path):
    out = tmp_path / "m"
    made = subprocess.run(
        [LIGHTCTL, "model", "tiny", "--arch", "qwen3", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0 and (out / "config.json").is_file()
    run = subprocess.run(
        [
            LIGHTCTL,
            "generate",
            "--model",
            str(out),
            "--device",
            "cpu",
            "--max-tokens",
            "8",
            "Hello",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "output (" in run.stdout
    bad = subprocess.run(
        [LIGHTCTL, "model", "tiny", "--arch", "gpt2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "choose one of llama, mistral, qwen2, qwen3" in bad.stderr


def test_up_brings_the_fleet_up_answers_and_stops_on_ctrl_c(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTPD_")}
    env.update(LIGHTPD_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    port = free_port()
    process = subprocess.Popen(
        [LIGHTCTL, "up", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    # A thread reads: select() on a buffered text pipe can miss lines already buffered.
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    try:
        while "Press Ctrl-C" not in (output := "".join(lines)):
            assert time.monotonic() < deadline, output
            assert process.poll() is None, output
            time.sleep(0.2)
        assert f"OpenAI endpoint: http://127.0.0.1:{port}/v1" in output
        assert "curl http://127.0.0.1" in output
        assert re.search(r"Example answer \(\d+ tokens\)", output), output
        assert (tmp_path / "home" / "fleet.json").is_file()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        reader.join(timeout=10)
    rest = "".join(lines)
    assert process.returncode == 0, rest
    assert "stopped." in rest
    assert not (tmp_path / "home" / "fleet.json").exists()
    # Redis kept its data (API keys, history) in the fleet's folder, on disk, but
    # not the nodes, which left on purpose: the next `up` lists none of them as dead.
    with EmbeddedRedis(data_dir=tmp_path / "home" / "redis") as kept:
        data = redis.Redis.from_url(kept.url)
        assert data.zcard("lightpd:requests") == 1  # the example request
        assert data.smembers("lightpd:nodes") == set()


def test_up_refuses_a_fleet_without_decode_nodes_before_starting_anything(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTPD_")}
    env.update(LIGHTPD_HOME=str(tmp_path / "home"))
    for option, value, message in (
        ("--decode-nodes", "0", "--decode-nodes must be at least 1"),
        ("--prefill-nodes", "-1", "--prefill-nodes must be 0 or more"),
    ):
        run = subprocess.run(
            [LIGHTCTL, "up", "--port", str(free_port()), option, value],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2 and message in run.stderr, run.stderr
        assert "Starting" not in run.stdout
    assert not (tmp_path / "home").exists()  # no model written, no fleet file
