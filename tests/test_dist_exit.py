"""``utils.dist.exit_process``: how a command-line process ends, with and without a process group.

Torch keeps a gloo group's threads running past ``destroy_process_group`` once a
``DistributedDataParallel`` wrapper was built over it; interpreter teardown beside those threads
aborted now and then ("terminate called without an active exception", rank 0 SIGABRT, 1 CI run
in ~30; a plain DDP script: 3 exits in 60 on this CPU). A process that was in a group therefore
leaves through ``os._exit`` after flushing its streams and log handlers; any other process exits
normally. Each case runs in its own interpreter: the pytest process has been in groups already.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dpt_engine.utils.dist import free_port

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[1]


def _run(body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(body))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}  # fmt: skip
    env.pop("PYTHONUNBUFFERED", None)  # stdout to a pipe stays block-buffered: the flush is tested
    return subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_after_a_ddp_group_the_process_ends_with_its_code_and_flushed_output(tmp_path):
    proc = _run(
        """
        import glob, logging
        import torch, torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        from dpt_engine.utils.dist import exit_process, shutdown_distributed

        log = logging.getLogger("prog")
        log.addHandler(logging.FileHandler("prog.log"))
        log.setLevel(logging.INFO)
        dist.init_process_group("gloo")
        net = DDP(torch.nn.Linear(4, 4))
        net(torch.ones(2, 4)).sum().backward()
        del net
        shutdown_distributed()
        alive = [t for t in glob.glob("/proc/self/task/*/comm") if "gloo" in open(t).read()]
        print(f"payload: gloo threads after destroy_process_group: {len(alive)}")  # buffered (a pipe)
        log.info("logged before exit")
        exit_process(5)
        print("not reached")
        """,
        tmp_path,
    )
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert "payload: gloo threads" in proc.stdout and "not reached" not in proc.stdout
    assert "terminate called" not in proc.stderr
    assert (tmp_path / "prog.log").read_text() == "logged before exit\n"


def test_a_process_that_never_joined_a_group_exits_normally(tmp_path):
    proc = _run(
        """
        import atexit
        from dpt_engine.utils.dist import exit_process

        atexit.register(lambda: print("atexit handlers ran"))
        try:
            exit_process(4)
        except SystemExit as e:  # the ordinary exit: cleanup code runs
            print(f"SystemExit {e.code}")
            raise
        """,
        tmp_path,
    )
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["SystemExit 4", "atexit handlers ran"]


def test_exit_process_leaves_a_group_the_command_did_not_leave(tmp_path):
    proc = _run(
        """
        import torch.distributed as dist
        from dpt_engine.utils.dist import exit_process

        dist.init_process_group("gloo")
        print("joined")
        exit_process(0)
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "joined\n"
