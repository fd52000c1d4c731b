"""wsss.cli.run, the wrapper every command runs in: Ctrl-C during an import."""
from __future__ import annotations

import signal
import sys
import time
from types import SimpleNamespace

import pytest

import wsss.cli as cli
from runner_kit import python_env


def _frames(*filenames):
    """A fake frame chain, innermost first."""
    frame = None
    for name in reversed(filenames):
        frame = SimpleNamespace(f_code=SimpleNamespace(co_filename=name), f_back=frame)
    return frame


def _wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)


def test_an_interrupt_inside_an_import_is_sent_again_later(monkeypatch):
    sent = []
    monkeypatch.setattr(cli, "_send_signal", lambda signum: sent.append(time.monotonic()))
    handler = cli._ImportSafeInterrupt()
    in_import = _frames("/x/torch/__init__.py", "<frozen importlib._bootstrap>", "/x/wsss/cli/infer.py")
    outside = _frames("/x/wsss/runner/pipeline.py", "/x/wsss/cli/infer.py")
    assert handler(signal.SIGINT, in_import) is None and handler.held  # held back ...
    assert handler(signal.SIGINT, in_import) is None  # (a second press joins the re-send on its way)
    _wait_for(lambda: sent)
    time.sleep(0.05)
    assert len(sent) == 1  # ... and sent again once, 10 ms later
    with pytest.raises(KeyboardInterrupt):  # outside any import: at once
        handler(signal.SIGINT, outside)
    assert not handler.held
    with pytest.raises(KeyboardInterrupt):  # an import that holds it back too long loses it
        handler.held_since = time.monotonic() - cli.INTERRUPT_GRACE_S - 1
        handler(signal.SIGINT, in_import)


def test_raising_or_closing_cancels_a_resend_on_its_way(monkeypatch):
    """Two presses, the second outside the import before the first's re-send: the re-send is
    dropped (it would land in the handling of the first, or after ``run`` returned); after
    ``close`` a re-send already sent is swallowed."""
    sent = []
    monkeypatch.setattr(cli, "_send_signal", lambda signum: sent.append(signum))
    handler = cli._ImportSafeInterrupt()
    handler(signal.SIGINT, _frames("<frozen importlib._bootstrap>"))
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGINT, _frames("/x/wsss/cli/infer.py"))
    time.sleep(0.1)
    assert sent == []
    handler(signal.SIGINT, _frames("<frozen importlib._bootstrap>"))
    handler.close()
    time.sleep(0.1)
    assert sent == [] and handler(signal.SIGINT, _frames("/x/wsss/cli/infer.py")) is None


_PROBE = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
with open(os.path.join(sys.argv[1], "slow_import.py"), "w") as f:
    f.write("import sys, time\\nprint('importing', flush=True)\\ntime.sleep(2.0)\\nprint('imported', flush=True)\\n")
from wsss.cli import run

def body(argv):
    import slow_import  # noqa: F401
    time.sleep(30)  # (the interrupt must end this)
    return 0

print("rc", run("probe", body), flush=True)
"""


def test_ctrl_c_during_an_import_lets_it_finish_then_interrupts(tmp_path):
    """The interrupt waits for the import to end: a module is never left half imported (one
    whose C initialisation was cut short cannot be imported again, and an interrupt in
    importlib's own bookkeeping could leave the import lock held and every other thread's
    next import waiting forever)."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", _PROBE, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=python_env())
    try:
        assert proc.stdout.readline().strip() == "importing"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert out.split() == ["imported", "rc", "130"], (out, err)
    assert err.strip() == "probe: interrupted"
