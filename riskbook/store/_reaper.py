"""The embedded server's reaper, run as a script: ``python _reaper.py HOME``.

Forks the reaper into a session of its own, prints its pid and exits at once (so the
process that started the server waits for nothing and leaves no zombie behind). The
reaper stops the server once no live process holds it: see
:func:`riskbook.store.embedded._reap_loop`.

It loads only the modules the embedded server needs (``riskbook.store.embedded``,
``riskbook._home``, ``riskbook.errors``), not the ``riskbook`` package with Polars: it
lives as long as the server and should weigh little.
"""

from __future__ import annotations

import os
import sys
import types


def main(home: str) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    package = os.path.dirname(here)
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        os._exit(0)
    os.setsid()
    os.chdir("/")  # hold no folder of the process that started it
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # the starter reads the pid until this end closes
    os.close(devnull)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    for name, path in (("riskbook", package), ("riskbook.store", here)):
        if name not in sys.modules:  # the package's folder, without running its __init__
            module = types.ModuleType(name)
            module.__path__ = [path]
            sys.modules[name] = module
    from riskbook.store.embedded import _reap_loop

    return _reap_loop(home)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
