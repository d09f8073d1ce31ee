"""--processes: how many receiver processes, and the channel that hands connections over."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import pytest

from stowaway import handoff
from stowaway.receiver_pool import available_cpus, cgroup_quota, receiver_processes
from stowaway.settings import RECEIVER, Settings, SettingsError, add_options, load_settings


def test_a_cgroup_v2_quota_caps_the_cpus(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(tmp_path) == 1.5


def test_no_cgroup_quota_means_no_cap(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path) is None


def test_a_cgroup_v1_quota_caps_the_cpus(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu/cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu/cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(tmp_path) == 3.0
    (tmp_path / "cpu/cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota(tmp_path) is None


def test_auto_is_the_cpus_this_process_may_use() -> None:
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))
    assert receiver_processes(Settings(processes=None)) == min(available_cpus(), 20)


def test_never_more_processes_than_associations() -> None:
    assert receiver_processes(Settings(processes=8, max_associations=3)) == 3
    assert receiver_processes(Settings(processes=1)) == 1


def _parse(*argv: str) -> Settings:
    parser = argparse.ArgumentParser()
    add_options(parser, {RECEIVER})
    return load_settings(parser.parse_args(list(argv)), environ={})


def test_processes_flag_takes_auto_or_a_positive_number() -> None:
    assert _parse().processes is None
    assert _parse("--processes", "auto").processes is None
    assert _parse("--processes", "3").processes == 3
    with pytest.raises(SettingsError, match="--processes"):
        _parse("--processes", "0")


def test_a_connection_travels_with_its_message() -> None:
    ours, theirs = handoff.channel()
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, address = server.accept()
    try:
        handoff.send(ours, ("connection", address, False), (accepted.fileno(),))
        accepted.close()  # the receiving side's copy keeps the connection open
        got = handoff.receive(theirs)
        assert got is not None
        message, fds = got
        assert message == ("connection", address, False)
        with socket.socket(fileno=fds[0]) as adopted:
            client.sendall(b"ping")
            assert adopted.recv(4) == b"ping"
    finally:
        client.close()
        server.close()
        ours.close()
        theirs.close()


def test_receive_without_waiting_and_at_the_end() -> None:
    ours, theirs = handoff.channel()
    with pytest.raises(BlockingIOError):
        handoff.receive(theirs, wait=False)
    handoff.send(ours, ("store", 0, 0.01, 10))
    assert handoff.receive(theirs, wait=False) == (("store", 0, 0.01, 10), [])
    ours.close()
    assert handoff.receive(theirs) is None
    theirs.close()
