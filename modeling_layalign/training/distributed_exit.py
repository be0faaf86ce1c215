"""Leaving a process that ran a distributed engine, once everything it produces is written (issue #32).

The engines keep their process groups referenced past `torch.distributed.destroy_process_group`: DeepSpeed ZeRO-3
from its module stack and from every partitioned weight, FSDP 2 from torch's DTensor caches, DDP from its wrapper
(measured under ZeRO-3: 2 groups with 6 gloo threads still running when the interpreter exits, 1 with 3 under the
other engines). The interpreter's finalization then tears them down while their threads run, and a communication
thread that runs Python at that moment aborts the process after a successful run ("terminate called without an
active exception", SIGABRT; reproduced in isolation by keeping one group referenced with an asynchronous all-reduce
in flight). Such a process runs its exit hooks and leaves without that finalization.
"""

import atexit
import os
import sys


def exit_without_finalization(status: int = 0) -> None:
    """Runs the `atexit` hooks (trackers, logging, multiprocessing's children), flushes the standard streams and
    ends the process with `status`, skipping the interpreter's teardown of objects that still hold live threads."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
