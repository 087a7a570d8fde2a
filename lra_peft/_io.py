"""Atomic output folders and the small file helpers that exports share."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

from transformers import AutoTokenizer

from .format import CONFIG_NAME

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _in_user_terms(exc: BaseException, hidden: str, shown: str) -> Optional[BaseException]:
    """A copy of `exc` that names `shown` (the path the user gave) wherever it named `hidden` (a temporary file or
    folder of ours, or a path inside it); None when it does not mention `hidden`."""

    def swap(name: object) -> object:
        if isinstance(name, (str, bytes)) and (os.fsdecode(name) + os.sep).startswith(hidden + os.sep):
            return shown + os.fsdecode(name)[len(hidden):]
        return name

    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        first, second = swap(exc.filename), swap(exc.filename2)
        if (first, second) == (exc.filename, exc.filename2):
            return None
        # A failed rename of our file onto the user's would name the same path twice.
        return type(exc)(exc.errno, exc.strerror, first, None, None if second == first else second)
    if hidden not in str(exc):
        return None
    try:
        return type(exc)(str(exc).replace(hidden, shown))
    except Exception:  # noqa: BLE001 - an exception class with another constructor keeps its own message
        return None


@contextmanager
def errors_naming(final: PathLike, tmp: PathLike) -> Iterator[None]:
    """Re-raise an error of the block that names the hidden temporary `tmp` (`.<name>.tmp-*`) as the same error
    naming `final`, the path the user gave: "Permission denied: 'out/adapter_model.safetensors'"."""
    try:
        yield
    except Exception as exc:
        clear = _in_user_terms(exc, os.fsdecode(tmp), os.fsdecode(final))
        if clear is None:
            raise
        raise clear from exc


def not_a_file(path: PathLike) -> Optional[str]:
    """What `path` is, in words for an error, when something is there but it is not a readable file: a folder, a
    symbolic link to a folder or to nothing (broken), a FIFO. None when it is a file, or when nothing is there."""
    path = Path(path)
    if path.is_file() or not os.path.lexists(path):
        return None
    if path.is_symlink():
        target = os.readlink(path)
        if not path.exists():
            return f"{path} is a symbolic link to {target}, which does not exist (a broken link)"
        return f"{path} is a symbolic link to {target}, which is {'a folder' if path.is_dir() else 'not a file'}"
    return f"{path} is a folder, not a file" if path.is_dir() else f"{path} is not a regular file"


def make_temp_dir(parent: Path, name: str) -> Path:
    """A hidden temporary folder in `parent`, with the permissions a plain mkdir would give (mkdtemp's are 0700,
    which would make a published adapter folder private to its writer once renamed into place). An error creating
    it names `parent / name`, the folder the user asked for."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror, str(Path(parent) / name)) from exc
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def make_temp_file(parent: Path, name: str) -> tuple[int, str]:
    """Like `tempfile.mkstemp` in `parent`, with the permissions a plain open() would give (not mkstemp's 0600). An
    error creating it names `parent / name`, the file the user asked for."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=parent)
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror, str(Path(parent) / name)) from exc
    os.chmod(tmp, 0o666 & ~_umask())
    return fd, tmp


def normalize_permissions(folder: Path) -> None:
    """Give `folder` and everything in it the permissions plain mkdir/open would (some writers, like safetensors and
    mkstemp, create private 0600 files), before it is published by a rename."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's) data to disk, where the file system supports it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every file system supports fsync (of folders)
    finally:
        os.close(fd)


def _sync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then `folder`: the data is on disk before a rename makes it visible."""
    for path in folder.rglob("*"):
        if path.is_file():
            fsync_path(path)
    fsync_path(folder)


def _commit_rank(path: Path) -> int:
    # adapter_config.json is what makes a folder an adapter: it goes after the weights, the card describing both last.
    return {CONFIG_NAME: 1, "README.md": 2}.get(path.name, 0)


def _move_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir(), key=lambda p: (_commit_rank(p), p.name)):
        target = dst / item.name
        if item.is_dir() and target.is_dir():
            _move_tree(item, target)
        else:
            os.replace(item, target)
    fsync_path(dst)


def publish_dir(tmp: Path, final: Path) -> None:
    """Publish the filled folder `tmp` as `final`, by renames only, after fsyncing its files.

    A new `final` appears whole (one rename of the folder). An existing one keeps its other files, as
    `save_pretrained` does, and each file of `tmp` replaces its old version atomically: the weights first,
    adapter_config.json after them, README.md last, so that a crash leaves no config describing missing weights.
    """
    _sync_tree(tmp)
    normalize_permissions(tmp)
    if not final.exists():
        try:
            os.replace(tmp, final)
            fsync_path(final.parent)
            return
        except OSError:
            pass  # another process created `final` meanwhile: merge file by file
    _move_tree(tmp, final)


@contextmanager
def atomic_output_dir(out_dir: PathLike) -> Iterator[Path]:
    """Yield a hidden temporary folder next to `out_dir`; on success its files land in `out_dir` (`publish_dir`), on
    error nothing does and the temporary folder is removed. A killed process can leave a `.<name>.tmp-*` folder
    behind, which is safe to delete. Errors that name the temporary folder name `out_dir` instead."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {out.absolute()} is a file; pass a folder path (it is created if "
                                 "missing)")
    # The temporary folder must be on the same file system as the target (a link's target), for renames to work.
    out = out.resolve() if out.exists() else out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, out.name)
    try:
        with errors_naming(out, tmp):
            yield tmp
            publish_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def temp_dir_beside(final: Path) -> Path:
    """The (emptied) temporary folder `.<name>.tmp` next to `final`, to fill and then `swap_in_dir` into place.

    Its name is fixed, not random, so that a run killed mid-write leaves at most one stale copy, which the next
    call removes."""
    tmp = final.parent / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def swap_in_dir(tmp: Path, final: Path) -> None:
    """Replace the folder `final` (if any) by the filled folder `tmp`, by renames only: a reader sees the old folder
    or the new one, never a mix. The files are on disk before the rename makes them visible."""
    _sync_tree(tmp)
    if final.exists():
        old = final.parent / f".{final.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_path(final.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, then `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp_file(path.parent, path.name)
    try:
        with errors_naming(path, tmp):
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tokenizer(src: PathLike | None, dst: PathLike, *, local_files_only: bool = True) -> bool:
    """Save the tokenizer that `src` (a folder, or a Hub id in the local cache) holds into `dst`; False if it has none.

    Goes through `AutoTokenizer.from_pretrained(src).save_pretrained(dst)`, so every file the tokenizer needs
    (vocab.txt, merges.txt, spm.model, bpe.codes, ...) is written, whatever its tokenizer class calls them.
    """
    if src is None:
        return False
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=local_files_only)
    except Exception:  # noqa: BLE001 - no tokenizer there (an adapter folder, a model saved without one) is fine
        return False
    tokenizer.save_pretrained(str(dst))
    return True


def same_folder(a: PathLike, b: PathLike) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def human_size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
