"""Which of our files one chat completion on the P/D path runs, in every process.

    python -m bench.request_walk [--model DIR]

Starts a fleet of one prefill and one decode node on this machine (every prompt
takes the KV hand-off), sends a chat completion to warm it up, then records, in
the control plane and both nodes, the files of every Python function called
while one more chat completion runs, and prints ours (under lightpd/), less the
kernels and the model definitions: the request's walk that docs/design.md lists.

Each process records through a ``sitecustomize`` module put first on its
PYTHONPATH: a profile hook in every thread that notes a function's file while
recording is on (SIGUSR1 starts it, SIGUSR2 writes the files and stops).
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

_files, _on = set(), [False]


def _profile(frame, event, arg):
    if _on[0] and event == "call":
        _files.add(frame.f_code.co_filename)


def _start(signum, frame):
    _files.clear()
    _on[0] = True


def _dump(signum, frame):
    _on[0] = False
    path = os.path.join(os.environ["LIGHTPD_WALK_DIR"], f"{os.getpid()}.txt")
    with open(path, "w") as out:
        out.write("\\n".join(sorted(_files)))


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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        hook_dir, walk_dir = Path(scratch, "hook"), Path(scratch, "walk")
        hook_dir.mkdir()
        walk_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(HOOK)
        os.environ["LIGHTPD_WALK_DIR"] = str(walk_dir)
        path = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook_dir), str(ROOT), path]))
        files = walk(args.model or tiny_model(Path(scratch)), walk_dir)
    ours = sorted(
        name
        for file in files
        if "/lightpd/" in file
        and not any(part in (name := file[file.index("/lightpd/") + 1 :]) for part in EXCLUDED)
    )
    print("\n".join(ours))
    print(f"{len(ours)} files of ours (kernels and model definitions aside)", file=sys.stderr)


def tiny_model(scratch: Path) -> str:
    from lightpd.common.tiny import write_tiny_checkpoint

    return str(write_tiny_checkpoint(scratch / "tiny", "qwen2"))


def walk(model: str, walk_dir: Path) -> set[str]:
    from tests.e2e.fleet import API_KEY, LocalFleet

    fleet = LocalFleet(model).start(prefill=1, decode=1)
    try:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        chat(fleet.url, headers)  # warm: first-call imports and compiles are not the walk
        pids = [fleet.control_plane.pid, *(node.process.pid for node in fleet.nodes)]
        for pid in pids:
            os.kill(pid, signal.SIGUSR1)
        time.sleep(0.2)
        chat(fleet.url, headers)
        for pid in pids:
            os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while len(list(walk_dir.iterdir())) < len(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        fleet.stop()
    return {line for file in walk_dir.iterdir() for line in file.read_text().splitlines()}


if __name__ == "__main__":
    main()
