"""Errors a person reads: what is wrong, where (the key or the file), and what to do, as one short block.

`UserError` is raised for mistakes in the command line, the config or the files it names; the CLI prints it with
`format_block` and exits with status 2, without a traceback (`--debug` or `R1V_DEBUG=1` shows one).
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: `what` is wrong, `where` (key, file, folders), and the `fix`."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None) -> None:
        super().__init__(what)
        self.what, self.where, self.fix = what, where, fix

    def __str__(self) -> str:
        return format_block(self.what, self.where, self.fix, header=False)


def format_block(what: str, where: str | None = None, fix: str | None = None, header: bool = True) -> str:
    """`error: WHAT` / `  where: ...` / `  fix: ...`: the cause on the first line, the remedy on the last."""
    lines = [f"error: {what}" if header else what]
    if where:
        lines.append(f"  where: {where}")
    if fix:
        lines.append(f"  fix: {fix}")
    return "\n".join(lines)
