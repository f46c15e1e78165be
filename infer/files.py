"""Files written whole or not at all: the one atomic writer of the run's outputs (the checkpoint here, and
analysis.rundir's JSON, CSV and netCDF files)."""
import os
from pathlib import Path


def umask() -> int:
    """This process's file-creation mask."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path, content) -> None:
    """Write content (str, or bytes-like) to path through a temporary file beside it (.<name>.<pid>.tmp) renamed into
    place, with the usual file mode (0666 & ~umask). Where the write fails (a full disk: OSError, naming path) the old
    file stays whole and no temporary file is left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(content) if isinstance(content, str) else tmp.write_bytes(content)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename is None:  # a failed write() names no file: name the one being written
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
