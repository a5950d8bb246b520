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

The machinery is ``lampseg.runtime.launcher`` (``launch``), where lampseg's own multi-process jobs (doctor,
bench, the tests) start this command through ``run_job``.
"""
from __future__ import annotations

import sys

from lampseg.runtime.launcher import LoopbackTCPStore, is_local_job, launch, loopback_ip

__all__ = ["LoopbackTCPStore", "is_local_job", "loopback_ip", "main"]


def main(argv: list[str] | None = None) -> None:
    """Run torchrun with ``argv`` (default ``sys.argv[1:]``), loopback-bound when the job is local."""
    launch(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
