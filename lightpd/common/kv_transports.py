"""The KV transports a node may take tensors over, by name: the one list of them.

A transport is one class (``lightpd.common.engine.connector.transport.Transport``)
named here by where it lives, so this module imports no torch: lightctl checks
``--kv-transport`` against these names, and a node builds its connector from them
(``make_connector``). A new transport is its file and one line here.
"""

TRANSPORTS: dict[str, str] = {
    # K/V as raw frames beside their headers, over the channel's own sockets.
    "zmq": "lightpd.common.engine.connector.zeromq:ZmqTransport",
    # A torch.distributed group per node pair: NCCL between GPUs, Gloo on CPU.
    "nccl": "lightpd.common.engine.connector.collective:CollectiveTransport",
}

# What --kv-transport takes: a transport, or "auto" (nccl on a GPU, else zmq).
TRANSPORT_CHOICES: tuple[str, ...] = ("auto", *TRANSPORTS)
TRANSPORT_HELP = (
    f"{', '.join(TRANSPORT_CHOICES)}: how KV tensors travel (auto: nccl on a GPU, else "
    "zmq; nccl is Gloo on CPU)."
)


def check_transport(name: str) -> None:
    """Raise ValueError, saying what is taken, unless ``name`` is "auto" or a transport."""
    if name != "auto" and name not in TRANSPORTS:
        *first, last = ("auto", *TRANSPORTS)
        raise ValueError(f"--kv-transport must be {', '.join(first)} or {last}, not {name!r}")


def resolve_transport(name: str, device_type: str) -> str:
    """The transport ``name`` stands for on a node whose device is of ``device_type``."""
    check_transport(name)
    if name == "auto":
        return "nccl" if device_type == "cuda" else "zmq"
    return name
