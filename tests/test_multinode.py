"""Multi-node training, simulated on one machine: one torchrun launcher per "node", joined by c10d
rendezvous on 127.0.0.1 (docs/MULTINODE.md has the real commands). Equality with one process, a
dead node, a frozen node, a node that never joins, and torchrun's in-place restart with --resume.

Each test starts processes tagged with a token in their environment, so that every launcher and
worker it started (also those reparented after their launcher died) can be found, waited for and
killed by pid in a `finally`: no orphan outlives a test."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from unifusion import config as C
from unifusion import checkpoint
from unifusion.training import loop as L

from .test_training import TINY, _train_args

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and PR_SET_PDEATHSIG")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _tagged(token: str) -> list[int]:
    """Live (not zombie) processes whose environment holds this test's token."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if token.encode() in (d / "environ").read_bytes() and (d / "stat").read_text().split(") ")[1][0] != "Z":
                pids.append(int(d.name))
        except OSError:  # gone, or not ours to read
            pass
    return pids


def _workers(launcher: subprocess.Popen) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                           text=True).stdout.split()]


class Nodes:
    """Two torchrun launchers, "nodes" 0 and 1, on one c10d rendezvous. Node 0 is started first and
    hosts the rendezvous store (node 1 starts once the port listens); which node's worker gets
    rank 0 is torchrun's choice."""

    def __init__(self, tmp_path, out, rdzv_conf="", max_restarts=0, env=None, **train):
        self.tmp, self.port, self.token = tmp_path, _free_port(), uuid.uuid4().hex
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "UNIFUSION_DIST_TIMEOUT": "30",
                    "UNIFUSION_TEST_TOKEN": self.token, **(env or {})}
        self.cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                    "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{self.port}", f"--rdzv-id={self.token[:8]}",
                    f"--max-restarts={max_restarts}", *([f"--rdzv-conf={rdzv_conf}"] if rdzv_conf else []),
                    "-m", "unifusion", "train", *_train_args(out, **train)]
        self.procs: list[subprocess.Popen] = []

    def start(self, n=2):
        """Call inside `with`, so that a failed start still kills what it started."""
        for i in range(n):
            if i:
                deadline = time.time() + 60
                while not _listening(self.port):
                    assert self.procs[0].poll() is None, self.output(0)
                    assert time.time() < deadline, "node 0 never opened the rendezvous port"
                    time.sleep(0.1)
            self.procs.append(subprocess.Popen(self.cmd, stdout=open(self.tmp / f"node{i}.log", "w"),
                                               stderr=subprocess.STDOUT, env=self.env, start_new_session=True))
        return self

    def output(self, i) -> str:
        return (self.tmp / f"node{i}.log").read_text(errors="replace").replace("\r", "\n")

    def wait(self, i, timeout, what):
        try:
            return self.procs[i].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{what}: node {i} still running after {timeout} s (a hang)\n{self.output(i)[-3000:]}")

    def wait_gone(self, timeout):
        """Every process of this test has ended (or fail, naming the survivors)."""
        deadline = time.time() + timeout
        while (left := _tagged(self.token)) and time.time() < deadline:
            time.sleep(0.2)
        assert not left, f"processes outlived the test: {left}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for pid in _tagged(self.token):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.wait(timeout=30)


def _wait_for_steps(log: Path, n: int, nodes: Nodes, timeout=90):
    deadline = time.time() + timeout
    while not (log.exists() and len(log.read_text().splitlines()) >= n):
        for i, p in enumerate(nodes.procs):
            assert p.poll() is None, (f"node {i} exited {p.returncode} before step {n}", nodes.output(i)[-3000:])
        assert time.time() < deadline, "training never started"
        time.sleep(0.1)


def _assert_same_model(run_a, run_b, tol=1e-5):
    a, b = checkpoint.load(run_a)[0]["model"], checkpoint.load(run_b)[0]["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=tol, atol=tol, msg=k)


EQUAL = dict(steps=8, checkpoint_every=8, data="gmm", process="edm", parametrization="edm", noise_density="lognormal")


def _one_process(out, **kw):
    """The reference: one process, the same global batch (in this interpreter, one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        L.train(C.from_dict({**TINY, **kw, "out": str(out)}), progress=False)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- a healthy 2-node job
def test_two_nodes_equal_one_process(tmp_path):
    """2 nodes x 1 rank (16 examples each) train the weights of 1 process with the global batch of 32;
    node 1 joins seconds after node 0 opened the rendezvous (a late node within join_timeout)."""
    with Nodes(tmp_path, tmp_path / "two", **EQUAL) as nodes:
        nodes.start()
        for i in range(2):
            assert nodes.wait(i, 120, "a healthy 2-node run") == 0, nodes.output(i)[-3000:]
        nodes.wait_gone(10)
    _one_process(tmp_path / "one", **EQUAL)
    _assert_same_model(tmp_path / "one", tmp_path / "two")


# ---------------------------------------------------------------- failures end the job, never hang it
def test_a_dead_node_ends_the_other_with_an_error(tmp_path):
    """kill -9 of one node's launcher and worker (a node lost), here the node hosting the rendezvous
    store: the other node's launcher loses the store and exits non-zero within seconds, and its
    worker stops too; nothing is left running. (A dead node that did not host the store: its peer's
    worker fails its next collective with `unifusion: error: ... Connection reset by peer`, see the
    first attempt in test_torchrun_restart_resumes_both_nodes_after_a_crash.)"""
    out = tmp_path / "run"
    with Nodes(tmp_path, out, steps=100000, checkpoint_every=100000, log_every=1) as nodes:
        nodes.start()
        _wait_for_steps(out / "log.jsonl", 2, nodes)
        dead = _workers(nodes.procs[0])
        assert len(dead) == 1, dead
        os.kill(dead[0], signal.SIGKILL)
        os.killpg(nodes.procs[0].pid, signal.SIGKILL)
        t0 = time.time()
        rc = nodes.wait(1, 60, "a node died")
        assert rc != 0, nodes.output(1)[-3000:]
        assert time.time() - t0 < 25, "the survivor waited out the 30 s timeout instead of seeing the dead peer"
        assert "RendezvousConnectionError" in nodes.output(1), nodes.output(1)[-3000:]
        nodes.wait_gone(45)


def test_a_frozen_node_times_out(tmp_path):
    """SIGSTOP of the node that does not host the store (a hung host, a partition: no connection is
    reset) is caught by the collective timeout, UNIFUSION_DIST_TIMEOUT (3 s here): the other node's
    worker errors and its launcher exits non-zero. (A frozen store host is not tested: the survivor's
    worker errors the same way, but its torchrun blocks on the frozen store, over 8 minutes when
    tried; docs/MULTINODE.md, "Limits".)"""
    out = tmp_path / "run"
    with Nodes(tmp_path, out, env={"UNIFUSION_DIST_TIMEOUT": "3"}, steps=100000, checkpoint_every=100000,
               log_every=1) as nodes:
        nodes.start()
        _wait_for_steps(out / "log.jsonl", 2, nodes)
        frozen = [nodes.procs[1].pid, *_workers(nodes.procs[1])]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        assert nodes.wait(0, 60, "a node froze") != 0
        text = nodes.output(0)
        assert "unifusion: error:" in text and "Timed out" in text, text[-3000:]


def test_a_node_that_never_joins_times_out_the_rendezvous(tmp_path):
    """One launcher of --nnodes=2 alone: torchrun gives up after join_timeout (default 600 s, 3 s here)
    with RendezvousTimeoutError, before any worker (or run folder) exists."""
    out = tmp_path / "run"
    with Nodes(tmp_path, out, rdzv_conf="join_timeout=3") as nodes:
        nodes.start(n=1)
        t0 = time.time()
        assert nodes.wait(0, 60, "waiting for a missing node") != 0
        assert time.time() - t0 < 40
        assert "RendezvousTimeoutError" in nodes.output(0), nodes.output(0)[-3000:]
        assert not out.exists()


# ---------------------------------------------------------------- torchrun's own restart, with --resume
def test_torchrun_restart_resumes_both_nodes_after_a_crash(tmp_path):
    """--max-restarts=1 with --resume in the command: after a rank is killed, torchrun restarts the
    workers of both nodes, which resume from the last checkpoint: the log does not repeat steps and
    the weights are those of one process that never crashed.
    Needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (pytorch#135712: with the shared store the
    restarted ranks read their peers' old addresses and gloo fails to connect)."""
    out = tmp_path / "run"
    kw = dict(steps=50, checkpoint_every=5, log_every=1)
    with Nodes(tmp_path, out, max_restarts=1, env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}, resume=True,
               **kw) as nodes:
        nodes.start()
        _wait_for_steps(out / "log.jsonl", 7, nodes)
        crashed = _workers(nodes.procs[1])
        assert len(crashed) == 1, crashed
        os.kill(crashed[0], signal.SIGKILL)
        for i in range(2):
            assert nodes.wait(i, 120, "a restart after a crash") == 0, nodes.output(i)[-3000:]
        nodes.wait_gone(10)
    assert "unifusion: error:" in nodes.output(0)  # the surviving rank's first attempt lost its peer
    assert "resumed from" in nodes.output(0) + nodes.output(1)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 51))
    assert checkpoint.load(out)[1]["step"] == 50
    _one_process(tmp_path / "one", **kw)
    _assert_same_model(tmp_path / "one", out)
