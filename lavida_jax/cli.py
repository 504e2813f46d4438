"""What every command line shares: a quiet console and one-line errors.

- Library logs (absl, Orbax, tfds, JAX, Python warnings) go to a log file (the
  workdir's `log.txt` for training) and not to the console, which keeps the
  progress bar and the results; `--verbosity=0` (absl's flag) brings INFO back.
- Any error ends in one line, `error: <what is wrong>`, and exit status 2: a bad
  flag, a missing checkpoint or image, a refused checkpoint, a request too long.
  `--traceback` shows the full traceback instead.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from absl import app, flags
from absl import logging as absl_logging

EXIT_USAGE = 2
LOG_FILE = "log.txt"

_TRACEBACK = flags.DEFINE_boolean(
    "traceback", False, "On an error, show the full traceback (default: one line).")


def one_line(e: BaseException) -> str:
  """An exception as the one line a user sees: its message, else its type."""
  if isinstance(e, SystemExit):
    return str(e.code).removeprefix("error: ")
  message = str(e)
  if "Traceback (most recent call last):" in message:  # ml_collections embeds one
    head, _, tail = message.partition("Traceback (most recent call last):")
    message = head + [line for line in tail.splitlines() if line.strip()][-1]
  text = " ".join(message.split()) if message.strip() else type(e).__name__
  if isinstance(e, (KeyError, AttributeError, TypeError, IndexError, ZeroDivisionError,
                    AssertionError, NotImplementedError, RuntimeError)):
    text = f"{type(e).__name__}: {text}"  # a bug more than a usage error: say which kind
  return text[:1000]


class _ConsoleFilter(logging.Filter):
  """Lets through only what a user should see: warnings and worse from outside the
  libraries whose routine chatter is INFO/WARNING (their errors still show)."""

  NOISY = ("absl", "orbax", "jax", "tensorflow_datasets", "asyncio", "py.warnings", "grain")

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and record.name != "asyncio":
      return True
    noisy = (record.name.split(".")[0] in self.NOISY or record.name in self.NOISY
             or "orbax" in record.pathname)
    return record.levelno >= logging.WARNING and not noisy


def quiet_logging(log_file: str | None) -> None:
  """Console: warnings of our own code and errors only (unless --verbosity was given);
  `log_file` (None: none) receives everything from INFO up."""
  root = logging.getLogger()
  console = absl_logging.get_absl_handler()
  if flags.FLAGS["verbosity"].present:
    return
  console.addFilter(_ConsoleFilter())
  logging.captureWarnings(True)  # Python warnings -> the 'py.warnings' logger -> the file
  if log_file:
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname).1s %(name)s %(filename)s:%(lineno)d] %(message)s"))
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    absl_logging.set_verbosity(absl_logging.INFO)


def fail(e: BaseException) -> None:
  """Exits with one line naming the problem (or re-raises with --traceback)."""
  if _TRACEBACK.value:
    raise e
  print(f"error: {one_line(e)}", file=sys.stderr)
  sys.exit(EXIT_USAGE)


def parse_flags(argv):
  """absl's parser, but a bad flag (or a --config file that does not load) is one line
  and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, OSError, ValueError) as e:
    print(f"error: {one_line(e)} (see --help)", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def run(main: Callable, log_file: Callable[[], str | None] | None = None,
        flags_parser=parse_flags) -> None:
  """absl.app.run(main) with the conventions above. log_file() names the log file once
  flags are parsed (e.g. from --workdir)."""

  def wrapped(argv):
    try:  # (naming the log file may load the config: its errors are one line too)
      quiet_logging(log_file() if log_file else None)
      return main(argv)
    except KeyboardInterrupt:
      raise
    except SystemExit as e:
      if e.code in (None, 0) or isinstance(e.code, int):
        raise
      fail(e)
    except Exception as e:  # pylint: disable=broad-except
      fail(e)

  app.run(wrapped, flags_parser=flags_parser)
