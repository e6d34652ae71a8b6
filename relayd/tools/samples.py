"""Where the Deribit sample captures are: ``../shared/testdata/deribit/`` next to the checkout.

A git worktree sits apart from the main checkout, so its own parent may not hold ``shared``;
then the main checkout's parent is asked too (read from the worktree's ``.git`` file, no git
command needed).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DERIBIT_SAMPLE", "REPO_ROOT", "deribit_dir"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DERIBIT_SAMPLE = "sample_capture_v1_6.pcapng"
_RELATIVE = Path("shared", "testdata", "deribit")


def _main_checkout(root: Path) -> Path | None:
    """The main checkout of the worktree at ``root`` (None when ``root`` is not one)."""
    git = root / ".git"
    if not git.is_file():
        return None
    text = git.read_text(encoding="utf-8", errors="replace").strip()
    if not text.startswith("gitdir:"):
        return None
    gitdir = (root / text.removeprefix("gitdir:").strip()).resolve()
    # <main>/.git/worktrees/<name>
    if gitdir.parent.name != "worktrees" or gitdir.parent.parent.name != ".git":
        return None
    return gitdir.parent.parent.parent


def deribit_dir(root: Path = REPO_ROOT) -> Path | None:
    """The folder holding the Deribit sample, or None when this is not a checkout next to it."""
    candidates = [root.parent / _RELATIVE]
    main = _main_checkout(root)
    if main is not None:
        candidates.append(main.parent / _RELATIVE)
    for candidate in candidates:
        if (candidate / DERIBIT_SAMPLE).is_file():
            return candidate
    return None
