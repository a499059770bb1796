"""A free TCP port on 127.0.0.1, held until the server that is given it has bound it.

Binding port 0 and closing the socket before the server starts leaves a window in which another process
may take the port. Here the socket stays bound (SO_REUSEADDR, never listening) until the caller closes
it: no other process can bind the port meanwhile, while a server that sets SO_REUSEADDR itself (Python's
HTTPServer, as optuna-dashboard's wsgiref server does; gunicorn) binds and listens on it (Linux)."""

from __future__ import annotations

import socket


def held_port() -> tuple[int, socket.socket]:
    """(port, the socket holding it): close the socket once the server answers on the port."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    return int(holder.getsockname()[1]), holder
