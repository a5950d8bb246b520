"""torchrun, with every socket it opens on loopback when the job is local: ``python -m lampseg.launch``.

    python -m lampseg.launch --standalone --nproc_per_node 2 -m lampseg train parallel=ddp
    python -m lampseg.launch --nnodes 2 --node_rank 0 --rdzv_backend c10d --rdzv_endpoint node0:29500 ...

It takes exactly torchrun's arguments. torch's ``TCPStore`` (the rendezvous store torchrun's agent hosts)
listens on every interface whatever address it is given (pytorch/pytorch#173909), and Gloo/NCCL pick an
interface from the host name. When the rendezvous address is a loopback one (``--standalone``, the default
``--master_addr 127.0.0.1``, ``localhost``), this launcher binds the store to that address itself (a
listening socket handed to ``TCPStore`` as ``master_listen_fd``), passes ``--local_addr 127.0.0.1`` so
the workers' store follows, and sets ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` to the loopback
interface unless they are set. A multi-node job names a reachable address and is left as torchrun makes it.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, static_tcp_rendezvous
from torch.distributed.run import main as torchrun

LOCAL_FLAGS = ("--standalone",)
ADDRESS_FLAGS = ("--rdzv_endpoint", "--rdzv-endpoint", "--master_addr", "--master-addr")


def loopback_ip(host: str) -> str | None:
    """The IPv4 loopback address ``host`` names (``127.0.0.1`` for ``localhost``), else None."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return None
    ips = {info[4][0] for info in infos}
    return min(ips) if ips and all(ipaddress.ip_address(ip).is_loopback for ip in ips) else None


class LoopbackTCPStore(dist.TCPStore):
    """``TCPStore`` whose server socket listens on the loopback address it was given, not on all
    interfaces (other hosts and clients are unchanged)."""

    def __init__(self, host_name: str, port: int, world_size: int | None = None, is_master: bool = False,
                 *args, **kwargs):
        names = ("timeout", "wait_for_workers", "multi_tenant", "master_listen_fd", "use_libuv")
        kwargs.update(zip(names, args))
        ip = loopback_ip(host_name) if is_master and kwargs.get("master_listen_fd") is None else None
        if ip is not None:
            try:
                server = socket.create_server((ip, port))  # SO_REUSEADDR, as TCPStore's own socket
            except OSError as e:  # torchrun retries, or joins as a client, on TCPStore's own error
                raise RuntimeError("Address already in use") from e
            kwargs.update(master_listen_fd=server.detach(), use_libuv=True)  # the store owns the fd now
        super().__init__(host_name, port, world_size, is_master, **kwargs)


def _value(argv: list[str], flags: tuple[str, ...]) -> str | None:
    for i, arg in enumerate(argv):
        for flag in flags:
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    return None


def is_local_job(argv: list[str]) -> bool:
    """Whether torchrun's arguments describe a job whose rendezvous is on this machine's loopback."""
    if any(a in LOCAL_FLAGS for a in argv):
        return True
    address = _value(argv, ADDRESS_FLAGS) or "127.0.0.1"  # torchrun's default master address
    if address.startswith("["):  # [IPv6]:port
        host = address[1:].split("]", 1)[0]
    else:
        host = address.rsplit(":", 1)[0] if address.count(":") == 1 else address
    return loopback_ip(host) is not None


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), None)


def main(argv: list[str] | None = None) -> None:
    """Run torchrun with ``argv`` (default ``sys.argv[1:]``), loopback-bound when the job is local."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if is_local_job(argv):
        for module in (dist, static_tcp_rendezvous, c10d_rendezvous_backend):
            module.TCPStore = LoopbackTCPStore
        if _value(argv, ("--local_addr", "--local-addr")) is None:
            argv = ["--local_addr", "127.0.0.1", *argv]
        interface = _loopback_interface()
        if interface is not None:
            for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                os.environ.setdefault(key, interface)
    torchrun(argv)


if __name__ == "__main__":
    main()
