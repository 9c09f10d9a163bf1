"""lightctl as a user runs it."""

import os
import subprocess
import sys

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
