"""A restarted process gives back the leases its killed previous run held on storage
commitment requests, and never judges another live process's."""

from __future__ import annotations

import os
import subprocess
import sys

from stowaway.commitment import dead_here, process_id
from stowaway.settings import Settings


def test_a_lease_of_this_nodes_dead_or_previous_run_is_released_and_no_other() -> None:
    settings = Settings(node_id="pod-0")
    me = process_id(settings)
    is_dead = dead_here(settings, me)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert is_dead(f"pod-0:{gone.stdout.strip()}:abcdef12")  # that process has exited
    assert is_dead(f"pod-0:{os.getpid()}:abcdef12")  # our pid, another run: a restart
    assert not is_dead(me)
    assert not is_dead(f"pod-0:{os.getppid()}:abcdef12")  # alive
    assert not is_dead(f"pod-1:{gone.stdout.strip()}:abcdef12")  # another node's
    assert not is_dead("garbage")


def test_a_live_sibling_receiver_process_is_never_judged_dead_and_a_killed_one_is() -> None:
    settings = Settings(node_id="pod-0")
    me = process_id(settings)
    is_dead = dead_here(settings, me)
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = f"pod-0:{sibling.pid}:abcdef12"
        assert not is_dead(owner)
        sibling.kill()
        sibling.wait()
        assert is_dead(owner)
    finally:
        if sibling.poll() is None:
            sibling.kill()
            sibling.wait()
