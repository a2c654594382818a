"""A task for the load-balancing tests: answers on TCP and UDP with its own name.

    python3 tests/taskserver.py NAME PORT [--peer]

TCP: sends ``NAME\\n`` on connect, then echoes every line back until the client closes
(so a test can hold a connection open and use it later). UDP: replies ``NAME`` to every
datagram. With ``--peer`` both say ``NAME PEER-ADDRESS`` instead: the client address the task saw.
"""

import socket
import sys
import threading


def serve_tcp(name: bytes, port: int) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen(512)
    while True:
        conn, peer = server.accept()
        greeting = name + (f" {peer[0]}".encode() if SHOW_PEER else b"")
        threading.Thread(target=echo, args=(conn, greeting), daemon=True).start()


def echo(conn: socket.socket, name: bytes) -> None:
    with conn:
        try:
            conn.sendall(name + b"\n")
            while data := conn.recv(4096):
                conn.sendall(data)
        except OSError:
            pass


def serve_udp(name: bytes, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    while True:
        _, addr = sock.recvfrom(2048)
        sock.sendto(name + (f" {addr[0]}".encode() if SHOW_PEER else b""), addr)


SHOW_PEER = "--peer" in sys.argv[3:]

if __name__ == "__main__":
    task_name, task_port = sys.argv[1].encode(), int(sys.argv[2])
    threading.Thread(target=serve_udp, args=(task_name, task_port), daemon=True).start()
    serve_tcp(task_name, task_port)
