"""The C ABI is defined once (relayd/_fastpath.c) and checked at load (relayd/fastpath/abi.py).

Variants of the C file are compiled with the project's own build step (hatch_build.py) and
loaded: a struct or a constant changed on the C side only must refuse to load, naming what
differs, instead of misreporting counters.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import pytest

import hatch_build
from relayd import fastpath

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "relayd" / "_fastpath.c"


def _variant(tmp_path: Path, edit: Callable[[str], str]) -> Path:
    """The library built from an edited copy of the C file (skips without a compiler)."""
    text = SOURCE.read_text()
    edited = edit(text)
    assert edited != text, "the edit did not apply"
    root = tmp_path / "src"
    (root / "relayd").mkdir(parents=True)
    (root / "relayd" / "_fastpath.c").write_text(edited)
    library = tmp_path / "_fastpath.so"
    if not hatch_build.build(library, root=root):
        pytest.skip("no C compiler")
    return library


def test_the_library_as_built_loads(tmp_path: Path) -> None:
    library = _variant(tmp_path, lambda text: text + "\n")
    plane = fastpath.open_library(library)
    assert plane.name == "C"


def test_two_fields_swapped_in_c_fail_at_load(tmp_path: Path) -> None:
    library = _variant(
        tmp_path,
        lambda text: text.replace(
            "F(uint64_t, bytes_in, ) F(uint64_t, frames_in, )",
            "F(uint64_t, frames_in, ) F(uint64_t, bytes_in, )",
        ),
    )
    with pytest.raises(fastpath.DataPathError) as caught:
        fastpath.open_library(library)
    message = str(caught.value)
    assert "struct rd_emit: field frames_in at offset" in message, message
    assert "in C, field bytes_in at offset" in message, message


def test_a_field_added_in_c_fails_at_load(tmp_path: Path) -> None:
    library = _variant(
        tmp_path,
        lambda text: text.replace(
            "F(uint64_t, acked, ) /* highest ACK received",
            "F(uint64_t, spare, ) F(uint64_t, acked, ) /* highest ACK received",
        ),
    )
    with pytest.raises(fastpath.DataPathError, match=r"struct rd_capture_rx: field spare"):
        fastpath.open_library(library)


def test_a_constant_changed_in_c_fails_at_load(tmp_path: Path) -> None:
    library = _variant(tmp_path, lambda text: text.replace("RD_SLOW = 8,", "RD_SLOW = 12,"))
    with pytest.raises(fastpath.DataPathError, match=r"constant RD_SLOW: 12 in C, 8 in Python"):
        fastpath.open_library(library)


def test_every_entry_point_releases_the_gil(tmp_path: Path) -> None:
    """Bound through ctypes.CDLL, never PyDLL: a data-path thread in C never holds the GIL."""
    plane = fastpath.open_library(_variant(tmp_path, lambda text: text + "\n"))
    functions = {name: fn for name, fn in vars(plane).items() if name.startswith("rd_")}
    assert set(functions) >= {
        "rd_emit_pump",
        "rd_emit_set_dest",
        "rd_capture_next",
        "rd_capture_done",
        "rd_capture_read",
    }
    for name, function in functions.items():
        assert not function._flags_ & ctypes._FUNCFLAG_PYTHONAPI, name  # type: ignore[attr-defined]
