"""Free TCP ports on 127.0.0.1 for the servers the tests start (SeaweedFS, a Ray head, Ray Serve)."""

import socket


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free a moment ago (all sockets held open until all are chosen)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
