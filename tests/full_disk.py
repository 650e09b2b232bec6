"""A disk that fills up: every file opened with `os.fdopen(fd, 'wb')` (how `checkpoints.atomic_write` opens
checkpoints and result files) fails with ENOSPC once it would hold more than a given number of bytes, as a real
full disk fails: in the unbuffered write under Python's 8 KiB buffer, so the writer (torch.save, np.savez) sees
the error in the middle of its work, or at the final flush.

As a module (tests/test_checkpoint.py, tests/test_faults.py): `install(monkeypatch, limit)`. As a script, main.py
on such a disk (tests/test_faults.py, bench/fault_matrix.py):

  FULL_DISK_BYTES=N python tests/full_disk.py --config ... --workdir W --mode train|eval ...
"""

import errno
import io
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FullFile(io.FileIO):
  """A file whose writes fail with ENOSPC once it would grow past `limit` bytes."""

  limit = 0

  def write(self, data):
    if self.tell() + len(memoryview(data)) > self.limit:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return super().write(data)


def full_fdopen(limit, real_fdopen=os.fdopen):
  """An `os.fdopen` whose binary write files fail past `limit` bytes; other modes are the real ones."""

  def fdopen(fd, mode='r', *args, **kwargs):
    if mode != 'wb':
      return real_fdopen(fd, mode, *args, **kwargs)
    raw = FullFile(fd, 'wb')
    raw.limit = limit
    return io.BufferedWriter(raw)

  return fdopen


def install(monkeypatch, limit):
  """Fills the disk for the rest of a test: `atomic_write`s fail past `limit` bytes (pytest's monkeypatch)."""
  monkeypatch.setattr(os, 'fdopen', full_fdopen(limit))


def run_main():
  sys.path.insert(0, ROOT)
  from absl import app  # pylint: disable=g-import-not-at-top
  import main  # pylint: disable=g-import-not-at-top
  os.fdopen = full_fdopen(int(os.environ['FULL_DISK_BYTES']))
  sys.argv[0] = os.path.join(ROOT, 'main.py')
  app.run(main.main, flags_parser=main.parse_flags)


if __name__ == '__main__':
  run_main()
