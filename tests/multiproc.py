"""Every test that starts processes runs them through this module, under a deadline.

A process that does not finish in time fails its test with which rank was still running and
what it was doing, instead of blocking CI (a gloo teardown deadlock on torch 2.1.2 once held a
rank forever after its work was done).

- :func:`spawn` runs ``fn(rank, *args)`` in ``nprocs`` spawned processes. A worker reports its
  phase with :func:`phase` and ends with :func:`end_distributed` (a barrier); once ``fn``
  returns, the process leaves without running Python finalizers, so nothing is left for an
  interpreter-exit destructor to deadlock on.
- :func:`run` runs a command (a tool, ``dist_train.sh``, the fake Slurm) in its own process
  group; on the deadline the whole group is killed, and the message names every process still
  alive with its rank (``RANK`` / ``SLURM_PROCID`` in its environment) and the output's tail.
- :func:`run_many` runs several commands at once (the nodes of a multi-node launch), each in
  its own process group, under one deadline, with the same kill and report.
"""
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

SPAWN_DEADLINE = 300   # seconds; the 2-process unit tests finish in 5-30 s
RUN_DEADLINE = 900     # seconds; the longest 2-process training test takes about 3 min alone

_status_dir = None
_rank = None


def phase(name: str) -> None:
    """Record what this rank is doing (shown if the test times out)."""
    if _status_dir is not None:
        with open(os.path.join(_status_dir, f'rank{_rank}'), 'w') as f:
            f.write(name)


def end_distributed() -> None:
    """A worker's last collective: wait for every rank, so that no rank leaves while another
    still needs it. The group is not destroyed: :func:`spawn`'s worker process then leaves with
    ``os._exit``, so no destructor of the group, of a DDP reducer or of pending gloo work runs
    (those destructors, run at interpreter exit, are where the torch 2.1.2 deadlock sat)."""
    import torch.distributed as dist
    phase('teardown: barrier')
    dist.barrier()
    phase('teardown: done')


def _entry(rank, fn, args, status_dir):
    global _status_dir, _rank
    _status_dir, _rank = status_dir, rank
    phase('starting')
    fn(rank, *args)
    phase('exiting')
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # results are written: leave without interpreter-exit finalizers


def _phases(status_dir, nprocs):
    out = {}
    for r in range(nprocs):
        try:
            with open(os.path.join(status_dir, f'rank{r}')) as f:
                out[r] = f.read()
        except OSError:
            out[r] = 'not started'
    return out


def spawn(fn, args=(), nprocs=2, deadline=SPAWN_DEADLINE, what=None):
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` that fails the test after ``deadline``
    seconds, naming the ranks still running and their last :func:`phase`."""
    import torch.multiprocessing as mp
    what = what or getattr(fn, '__qualname__', 'worker')
    with tempfile.TemporaryDirectory() as status_dir:
        ctx = mp.start_processes(_entry, args=(fn, tuple(args), status_dir), nprocs=nprocs,
                                 join=False, start_method='spawn')
        end = time.monotonic() + deadline
        while not ctx.join(timeout=0.5):
            if time.monotonic() > end:
                phases = _phases(status_dir, nprocs)
                alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                for p in ctx.processes:
                    p.join(5)
                detail = '; '.join(f'rank {r}: {"still running" if r in alive else "exited"} '
                                   f'(last phase: {phases[r]})' for r in range(nprocs))
                pytest.fail(f'{what} with {nprocs} processes did not finish in {deadline} s: '
                            f'{detail}', pytrace=False)


def _group_members(pgid):
    """(pid, rank, command) of the live processes in process group ``pgid`` (Linux /proc)."""
    out = []
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                cmd = f.read().replace(b'\0', b' ').decode(errors='replace').strip()
            with open(f'/proc/{pid}/environ', 'rb') as f:
                env = dict(kv.split(b'=', 1) for kv in f.read().split(b'\0') if b'=' in kv)
        except (OSError, ProcessLookupError):
            continue
        rank = env.get(b'RANK', env.get(b'SLURM_PROCID', b'-')).decode()
        out.append((int(pid), rank, cmd[:160]))
    return out


def _run(cmd, cwd, env, deadline, what, merged):
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merged else subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        alive = _group_members(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()  # every writer of the pipes is dead now: this returns
        procs = '\n'.join(f'  pid {pid}, rank {rank}: {c}' for pid, rank, c in alive)
        pytest.fail(f'{what or " ".join(map(str, cmd[:3]))} did not finish in {deadline} s; '
                    f'still running:\n{procs}\nlast output:\n{out[-4000:]}{err or ""}',
                    pytrace=False)
    finally:
        if proc.poll() is None:
            proc.kill()
    try:  # a process the command left behind in its group (none should be) goes too
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.returncode, out, err


def run(cmd, cwd=None, env=None, deadline=RUN_DEADLINE, what=None):
    """Run ``cmd`` in a new process group; return ``(returncode, stdout and stderr together)``.
    After ``deadline`` seconds every process of the group is killed and the test fails, listing
    the processes that were still alive (with their rank) and the output's tail."""
    return _run(cmd, cwd, env, deadline, what, merged=True)[:2]


def run_split(cmd, cwd=None, env=None, deadline=RUN_DEADLINE, what=None):
    """:func:`run` with stdout and stderr apart: ``(returncode, stdout, stderr)``."""
    return _run(cmd, cwd, env, deadline, what, merged=False)


def run_many(cmds, cwd=None, envs=None, deadline=RUN_DEADLINE, what=None, grace=30):
    """Run the commands concurrently, each in a new process group (``envs[i]`` is the
    environment of ``cmds[i]``); return ``[(returncode, stdout and stderr together), ...]`` in
    their order once all have ended.

    After ``deadline`` seconds every process of every group is killed and the test fails,
    listing for each command the processes still alive (with their rank) and its output's
    tail. A command that fails does not leave the others waiting for it until the deadline
    (as the other nodes of a launch would, in their rendezvous): ``grace`` seconds after the
    first non-zero exit, the commands still running are killed (their returncode is then
    ``-9``) and the results are returned."""
    envs = list(envs) if envs is not None else [None] * len(cmds)
    names = what or [' '.join(map(str, c[:3])) for c in cmds]
    with tempfile.TemporaryDirectory() as tmp:
        logs = [open(os.path.join(tmp, f'out{i}'), 'w+') for i in range(len(cmds))]
        procs = []
        try:
            # output to files, not pipes: nothing to drain while waiting, and a child that
            # keeps its output open cannot block the collection
            for cmd, env, log in zip(cmds, envs, logs):
                procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log,
                                              stderr=subprocess.STDOUT, text=True,
                                              start_new_session=True))
            end = time.monotonic() + deadline
            stop = None  # when the others go, after a failure
            while any(p.poll() is None for p in procs):
                now = time.monotonic()
                if stop is None and any(p.returncode not in (None, 0) for p in procs):
                    stop = now + grace
                if stop is not None and now > stop:
                    break
                if now > end:
                    alive = [_group_members(p.pid) for p in procs]
                    _kill_groups(procs)
                    report = []
                    for name, p, members, log in zip(names, procs, alive, logs):
                        log.seek(0)
                        state = ('still running:\n' + '\n'.join(
                            f'  pid {pid}, rank {rank}: {c}' for pid, rank, c in members)
                            if members else f'exited {p.returncode}')
                        report.append(f'[{name}] {state}\nlast output:\n{log.read()[-3000:]}')
                    pytest.fail(f'{len(cmds)} commands did not finish in {deadline} s:\n'
                                + '\n'.join(report), pytrace=False)
                time.sleep(0.2)
            _kill_groups(procs)  # what a command left behind in its group (none should be)
            results = []
            for p, log in zip(procs, logs):
                log.seek(0)
                results.append((p.returncode, log.read()))
            return results
        finally:
            _kill_groups(procs)
            for log in logs:
                log.close()


def _kill_groups(procs):
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in procs:
        p.wait()
