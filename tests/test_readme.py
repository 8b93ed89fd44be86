"""The README's Python tour runs as written (against a fresh database)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_python_tour_runs(
    make_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README lost its Python tour"
    monkeypatch.setenv("RISKBOOK_DSN", make_database())
    monkeypatch.setenv("RISKBOOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(ROOT)
    code = blocks[0].replace('"audit-copy/"', repr(str(tmp_path / "audit-copy")))
    scope: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), scope)
    history = scope["history"]
    trades = history.trades  # type: ignore[attr-defined]
    assert 1_000 < trades.height < 18_000  # the sample, as known on the morning of the 9th
    assert str(trades["timestamp"].max()) <= "2024-01-09 16:20:00+00:00"
    assert (tmp_path / "audit-copy" / "history.json").exists()
    for block in blocks[1:]:  # the live tour goes on from the same store
        exec(compile(block, "README.md", "exec"), scope)
    assert scope["answer"].account_id == "ACC-1"  # type: ignore[attr-defined]
    assert not scope["p"].running  # type: ignore[attr-defined]
    scope["store"].close()  # type: ignore[attr-defined]
