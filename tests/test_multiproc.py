"""The deadline every multi-process test runs under (tests/multiproc.py): a hung rank fails its
test in time, naming the rank and its phase, for spawned workers and for launched commands."""
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.multiproc import end_distributed, phase, run, run_many, spawn


def _port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir, sleeper):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    phase('init_process_group')
    dist.init_process_group('gloo', rank=rank, world_size=2)
    t = torch.full((3,), float(rank + 1))
    dist.all_reduce(t)
    if rank == sleeper:
        phase('sleeping on purpose')
        time.sleep(600)
    torch.save(t, os.path.join(out_dir, f'rank{rank}.pt'))
    end_distributed()


def _raises(rank):
    if rank == 1:
        raise ValueError('rank 1 fails on purpose')


@pytest.mark.integration
def test_spawned_ranks_finish_and_leave(tmp_path):
    spawn(_worker, args=(_port(), str(tmp_path), -1), deadline=120)
    for r in range(2):
        assert torch.equal(torch.load(tmp_path / f'rank{r}.pt', weights_only=True),
                           torch.full((3,), 3.0))


@pytest.mark.integration
def test_a_sleeping_rank_fails_the_test_within_the_deadline(tmp_path):
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as exc:
        spawn(_worker, args=(_port(), str(tmp_path), 1), deadline=15, what='the hang test')
    took = time.monotonic() - start
    assert took < 15 + 10, took
    msg = str(exc.value)
    assert 'the hang test with 2 processes did not finish in 15 s' in msg
    assert 'rank 1: still running (last phase: sleeping on purpose)' in msg
    # rank 0 waits for rank 1 in the last barrier
    assert 'rank 0: still running (last phase: teardown: barrier)' in msg


def test_a_failing_rank_raises_its_error():
    with pytest.raises(mp.ProcessRaisedException, match='rank 1 fails on purpose'):
        spawn(_raises, deadline=60)


def test_a_launched_command_that_hangs_is_killed_with_its_children():
    """A child that keeps the output pipe open (as a torchrun worker does) would block
    ``subprocess.run(..., timeout=)`` forever after the timeout: the whole group is killed."""
    script = 'RANK=1 sleep 600 & echo started; wait'
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as exc:
        run(['bash', '-c', script], deadline=3, what='the fake launcher')
    assert time.monotonic() - start < 3 + 10
    msg = str(exc.value)
    assert 'the fake launcher did not finish in 3 s' in msg
    assert 'rank 1: sleep 600' in msg and 'started' in msg


def test_a_launched_command_returns_its_status_and_output():
    rc, out = run([sys.executable, '-c', 'import sys; print("out"); sys.exit(3)'], deadline=60)
    assert rc == 3 and out.strip() == 'out'


def test_concurrent_commands_return_their_status_and_output_in_order():
    code = 'import sys, time; time.sleep({}); print({!r}); sys.exit({})'
    start = time.monotonic()
    results = run_many([[sys.executable, '-c', code.format(3, 'first', 0)],
                        [sys.executable, '-c', code.format(3, 'second', 4)]], deadline=60,
                       grace=30)
    assert [(rc, out.strip()) for rc, out in results] == [(0, 'first'), (4, 'second')]
    assert time.monotonic() - start < 5.5  # side by side (one after the other: over 6 s)


def _gone(pid, within=5.0):
    """Whether process ``pid`` has ended (or is a zombie) within ``within`` seconds."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            with open(f'/proc/{pid}/stat') as f:
                if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_one_hanging_command_of_several_fails_the_test_and_all_are_killed():
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as exc:
        run_many([['bash', '-c', 'echo node0 done'],
                  ['bash', '-c', 'RANK=1 sleep 600 & echo "node1 started $!"; wait']],
                 deadline=3, what=['node 0', 'node 1'])
    assert time.monotonic() - start < 3 + 10
    msg = str(exc.value)
    assert '2 commands did not finish in 3 s' in msg
    assert '[node 0] exited 0' in msg and 'node0 done' in msg
    assert '[node 1] still running' in msg and 'rank 1: sleep 600' in msg
    sleeper = int(msg.rsplit('node1 started ', 1)[1].split()[0])  # its output, not its command
    assert _gone(sleeper), 'the hanging child was left running'


def test_a_failing_command_does_not_leave_the_others_waiting_for_the_deadline():
    """As a node whose peer died waits in its rendezvous: killed ``grace`` s after the failure."""
    start = time.monotonic()
    results = run_many([['bash', '-c', 'echo broken; exit 3'],
                        ['bash', '-c', 'sleep 600 & echo $!; wait']], deadline=120, grace=2)
    assert time.monotonic() - start < 2 + 10
    assert results[0] == (3, 'broken\n')
    assert results[1][0] == -9 and _gone(int(results[1][1]))
