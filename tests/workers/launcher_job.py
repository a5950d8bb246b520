"""torchrun worker for tests/test_launcher.py, by ``MODE``:

* ``pass``: prints its rank (nothing else: the job must be quick);
* ``fail``: rank 1 raises ``ValueError``;
* ``hang``: joins the job's process group (gloo, one all-reduce), writes ``FOLDER/rank<R>.pids`` (its pid and
  that of a child it starts in a session of its own, as torchrun starts workers), prints that it joined and
  sleeps forever; rank 1 ignores SIGTERM, so only SIGKILL ends it.

    python -m lampseg.launch --nproc_per_node 2 tests/workers/launcher_job.py MODE FOLDER
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

mode, folder, rank = sys.argv[1], Path(sys.argv[2]), int(os.environ["RANK"])
if mode == "pass":
    print(f"rank {rank} of {os.environ['WORLD_SIZE']} done", flush=True)
elif mode == "fail":
    print(f"rank {rank} starts", flush=True)
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
elif mode == "hang":
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    total = torch.tensor([1.0])
    dist.all_reduce(total)
    if rank == 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    (folder / f"rank{rank}.pids").write_text(f"{os.getpid()} {child.pid}")
    print(f"rank {rank} joined a group of {int(total)} and hangs", flush=True)
    while True:
        time.sleep(60)
