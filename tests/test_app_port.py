"""`python app.py` keeps its port across a restart (the old socket in TIME_WAIT)."""

from __future__ import annotations

import socket

from app import free_port


def test_a_port_in_time_wait_is_reused_not_skipped():
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    server.listen()
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the server side closes first: its end of the connection enters TIME_WAIT
    server.close()
    client.close()
    assert free_port("127.0.0.1", port) == port


def test_a_port_in_use_moves_to_the_next():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        assert free_port("127.0.0.1", port) != port
    finally:
        busy.close()
