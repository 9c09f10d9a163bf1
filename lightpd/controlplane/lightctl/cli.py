"""lightctl: the command line of a lightpd fleet."""

from pathlib import Path
from typing import Annotated

import typer

from lightpd.controlplane.lightctl.bench.command import bench
from lightpd.controlplane.lightctl.nodes import node_app, status
from lightpd.controlplane.lightctl.up import up

app = typer.Typer(help="Run and manage a lightpd fleet.", no_args_is_help=True)
model_app = typer.Typer(help="Model utilities.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(node_app, name="node")
app.command()(up)
app.command()(status)
app.command()(bench)


@model_app.command("tiny")
def model_tiny(
    out: Annotated[Path, typer.Option(help="Directory to write the checkpoint to.")],
    arch: Annotated[str, typer.Option(help="llama, mistral, qwen2 or qwen3.")] = "llama",
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "float32",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a small random-weight checkpoint with a working tokenizer and chat template."""
    from lightpd.common.tiny import ARCHITECTURES, write_tiny_checkpoint

    if arch not in ARCHITECTURES:
        raise typer.BadParameter(f"choose one of {', '.join(ARCHITECTURES)}", param_hint="--arch")
    write_tiny_checkpoint(out, arch, dtype=dtype, seed=seed)
    typer.echo(f"wrote a tiny {arch} checkpoint to {out}")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The user message (or raw text with --raw).")],
    model: Annotated[Path, typer.Option(help="Local Hugging Face model directory.")],
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 32,
    temperature: Annotated[float, typer.Option(help="0 for greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda:N.")] = "auto",
    raw: Annotated[bool, typer.Option(help="Complete the text as is, no chat template.")] = False,
) -> None:
    """Generate a reply offline, in this process, with the in-process engine."""
    from lightpd.common.engine import EngineConfig, LLMEngine
    from lightpd.common.tokenizer import encode_chat, load_tokenizer
    from lightpd.common.wire.sampling_params import SamplingParams

    if not (model / "config.json").is_file():
        typer.echo(f"error: {model} is not a model directory (no config.json)", err=True)
        raise typer.Exit(2)
    tokenizer = load_tokenizer(model)
    if raw:
        prompt_ids = tokenizer.encode(prompt)
    else:
        prompt_ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    engine = LLMEngine(EngineConfig(model=str(model), device=device))
    params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, seed=seed)
    [output_ids] = engine.generate([prompt_ids], params)
    typer.echo(f"prompt ({len(prompt_ids)} tokens): {prompt}")
    text = tokenizer.decode(output_ids, skip_special_tokens=True)
    typer.echo(f"output ({len(output_ids)} tokens): {text}")
