from typing import Annotated

import typer

from common.node.cli import (
    ClusterToken,
    ControlPlane,
    Device,
    Dtype,
    GpuMemory,
    Host,
    MaxReqs,
    Model,
    ModelLen,
    NodeId,
    Port,
    PrefillTokens,
    Slots,
    engine_config,
    run_node,
    serve,
)
from common.node.runtime import default_node_id

app = typer.Typer(add_completion=False)


@app.command()
def main(
    model: Model,
    device: Device = "auto",
    dtype: Dtype = "auto",
    host: Host = "127.0.0.1",
    port: Port = 0,
    kv_port: Annotated[int, typer.Option(help="KV receive port; 0 picks a free one.")] = 0,
    num_kv_slots: Slots = None,
    max_num_reqs: MaxReqs = 256,
    max_prefill_tokens: PrefillTokens = 8192,
    max_model_len: ModelLen = None,
    gpu_memory_fraction: GpuMemory = 0.9,
    node_id: NodeId = None,
    control_plane: ControlPlane = None,
    cluster_token: ClusterToken = None,
) -> None:
    """Run a decode node."""
    from decode_node.server import DecodeNodeConfig, DecodeServer

    def start() -> None:
        if not cluster_token:
            raise ValueError(
                "--cluster-token (or LIGHTPD_CLUSTER_TOKEN) is needed: it keys the node plane"
            )
        config = DecodeNodeConfig(
            engine=engine_config(
                model,
                device,
                dtype,
                num_kv_slots,
                max_num_reqs,
                max_prefill_tokens,
                max_model_len,
                gpu_memory_fraction,
            ),
            node_id=node_id or default_node_id("decode"),
            cluster_token=cluster_token,
            host=host,
            control_port=port,
            kv_port=kv_port,
        )
        server = DecodeServer(config)
        serve(server, "decode", control_plane, cluster_token)

    run_node(start)


if __name__ == "__main__":
    app()
