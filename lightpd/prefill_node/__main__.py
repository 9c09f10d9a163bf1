from lightpd.common.node.cli import node_app


def _server(config):
    from lightpd.prefill_node.server import PrefillServer

    return PrefillServer(config)


app = node_app("prefill", _server)

if __name__ == "__main__":
    app()
