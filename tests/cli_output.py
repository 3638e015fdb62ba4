"""What the `calmrl` command prints when it refuses an input, read from pytest's captured output."""


def one_error_line(capsys, command: str) -> str:
    """The error report: one `calmrl COMMAND: error: ...` line, last on stderr (progress bars may precede it)."""
    err = capsys.readouterr().err
    prefix = f"calmrl {command}: error: "
    assert err.count(prefix) == 1 and "Traceback" not in err, err
    line = err[err.index(prefix):]
    assert line.endswith("\n") and "\n" not in line[:-1], line
    return line
