"""Which of our files one chat completion on the P/D path runs, in every process.

    python -m bench.request_walk [--model DIR]

Starts a fleet of one prefill and one decode node on this machine (every prompt
takes the KV hand-off), sends a chat completion to warm it up, then records, in
the control plane and both nodes, the files of every Python function called
while one more chat completion runs, and prints ours (under lightpd/), less the
kernels and the model definitions: the request's walk that docs/design.md lists.

What runs beside the request (heartbeats, lease renewals, the time-series
flusher, the nodes' idle polls) is not its walk: the functions an idle fleet
runs in ``--idle-s`` seconds just before are left out, and a file counts when
the request ran a function of it that the idle fleet did not. ``--all`` prints
every file run in the request's window instead.

Each process records through a ``sitecustomize`` module put first on its
PYTHONPATH: a profile hook in every thread that notes each function called
while recording is on (SIGUSR1 starts it, SIGUSR2 writes them and stops).
"""

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
HOOK = """
import os, signal, sys, threading

_called, _on, _dumps = set(), [False], [0]


def _profile(frame, event, arg):
    if _on[0] and event == "call":
        code = frame.f_code
        _called.add(f"{code.co_filename}\\t{code.co_firstlineno}")


def _start(signum, frame):
    _called.clear()
    _on[0] = True


def _dump(signum, frame):
    _on[0] = False
    _dumps[0] += 1
    name = f"{os.getpid()}.{_dumps[0]}.txt"
    with open(os.path.join(os.environ["LIGHTPD_WALK_DIR"], name), "w") as out:
        out.write("\\n".join(sorted(_called)))


if os.environ.get("LIGHTPD_WALK_DIR"):
    sys.setprofile(_profile)
    threading.setprofile(_profile)
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _dump)
"""
EXCLUDED = ("lightpd/kernels/", "lightpd/common/engine/models/", "lightpd/common/engine/layers/")


def chat(url: str, headers: dict[str, str]) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "How fast is decode on one GPU?"}],
        "max_tokens": 8,
    }
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    reply.raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a checkpoint (default: a tiny qwen2)")
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--all", action="store_true", help="every file the window ran")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        hook_dir, walk_dir = Path(scratch, "hook"), Path(scratch, "walk")
        hook_dir.mkdir()
        walk_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(HOOK)
        os.environ["LIGHTPD_WALK_DIR"] = str(walk_dir)
        path = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook_dir), str(ROOT), path]))
        idle, request = walk(args.model or tiny_model(Path(scratch)), walk_dir, args.idle_s)
    called = request if args.all else request - idle
    ours = sorted({ours for function in called if (ours := _ours(function.split("\t")[0]))})
    print("\n".join(ours))
    print(f"{len(ours)} files of ours (kernels and model definitions aside)", file=sys.stderr)


def _ours(file: str) -> str | None:
    """The file's path from lightpd/, or None if it is not ours or is excluded."""
    if "/lightpd/" not in file:
        return None
    name = file[file.rindex("/lightpd/") + 1 :]
    return None if any(name.startswith(part) for part in EXCLUDED) else name


def tiny_model(scratch: Path) -> str:
    from lightpd.common.tiny import write_tiny_checkpoint

    return str(write_tiny_checkpoint(scratch / "tiny", "qwen2"))


def walk(model: str, walk_dir: Path, idle_s: float) -> tuple[set[str], set[str]]:
    """The functions called in every process while the fleet idles ``idle_s``, and
    while the request runs."""
    from tests.e2e.fleet import API_KEY, LocalFleet

    fleet = LocalFleet(model).start(prefill=1, decode=1)
    try:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        chat(fleet.url, headers)  # warm: first-call imports and compiles are not the walk
        pids = [fleet.control_plane.pid, *(node.process.pid for node in fleet.nodes)]
        windows = []
        for window in (lambda: time.sleep(idle_s), lambda: chat(fleet.url, headers)):
            for pid in pids:
                os.kill(pid, signal.SIGUSR1)
            time.sleep(0.2)
            window()
            for pid in pids:
                os.kill(pid, signal.SIGUSR2)
            number = len(windows) + 1
            deadline = time.monotonic() + 10
            while len(list(walk_dir.glob(f"*.{number}.txt"))) < len(pids):
                assert time.monotonic() < deadline, "a process did not write what it recorded"
                time.sleep(0.1)
            windows.append(
                {
                    line
                    for f in walk_dir.glob(f"*.{number}.txt")
                    for line in f.read_text().split("\n")
                }
            )
    finally:
        fleet.stop()
    return windows[0], windows[1]


if __name__ == "__main__":
    main()
