from lightpd.common.node.cli import node_app


def _server(config):
    from lightpd.decode_node.server import DecodeServer

    return DecodeServer(config)


app = node_app("decode", _server)

if __name__ == "__main__":
    app()
