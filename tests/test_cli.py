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


def test_an_interrupt_inside_an_import_is_sent_again_later(monkeypatch):
    sent = []
    monkeypatch.setattr(cli, "_send_sigint_later", lambda delay: sent.append(delay))
    handler = cli._ImportSafeInterrupt()
    in_import = _frames("/x/torch/__init__.py", "<frozen importlib._bootstrap>", "/x/wsss/cli/infer.py")
    assert handler(signal.SIGINT, in_import) is None  # held back ...
    deadline = time.monotonic() + 5
    while not sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sent == [0.01]  # ... and sent again in 10 ms
    with pytest.raises(KeyboardInterrupt):  # outside any import: at once
        handler(signal.SIGINT, _frames("/x/wsss/runner/pipeline.py", "/x/wsss/cli/infer.py"))
    with pytest.raises(KeyboardInterrupt):  # an import that holds it back too long loses it
        handler.held_since = time.monotonic() - cli.INTERRUPT_GRACE_S - 1
        handler(signal.SIGINT, in_import)


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
