"""One module per command (wsss/cli/<command>.py, each with ``main(argv=None) -> int``).

Heavy imports (torch, models, readers) are deferred into the command bodies so ``--help``
is fast.  ``run`` turns expected mistakes (WsssError) and failures of the file system (OSError: a full
disk, a path that cannot be made) into one clear line and exit code 2.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence


def run(prog: str, body: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run a command body; WsssError -> 'prog: error: message' on stderr and exit code 2."""
    import warnings

    from wsss.errors import WsssError

    # NB: a warning for the user (bf16 on a CPU without bf16 units, ...) reads as one line of the
    # command, not as Python's "file:line: RuntimeWarning:" with a line of source code
    warnings.formatwarning = lambda message, category, *a, **k: f"{prog}: warning: {message}\n"
    try:
        return int(body(argv) or 0)
    except WsssError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the command could not use (a full disk, a folder where a file goes, ...)
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except ImportError as e:
        from wsss._library import OpLibraryError

        if not isinstance(e, OpLibraryError):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)  # (a missing or mismatched op library: how to rebuild)
        return 2
