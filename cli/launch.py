"""``accel launch``: ``accel train`` on several processes, over torch's own launcher.

    accel launch [LAUNCHER OPTIONS] [train] [RUN_CONFIG] [TRAIN FLAGS ...]

The launcher options are torchrun's (``--nproc_per_node``, ``--nnodes``, ``--node_rank``,
``--master_addr``, ``--master_port``, ``--rdzv_*`` ...), parsed by torchrun's own parser and
run by its elastic agent (``torch.distributed.run``); nothing here spawns processes itself.
The word ``train`` may be left out when a run config file comes next.

What it adds over ``torchrun -m accel.cli train``:

- the train arguments get the cheap checks ``accel train`` does first (flags, run config file,
  values, paths, data files, model folder) before any process starts: a mistake is one
  ``accel: error:`` line and exit 2;
- a user error raised inside the workers is handed to the launcher through torch's per-worker
  error file (``TORCHELASTIC_ERROR_FILE``) instead of being printed there, and the launcher
  prints it once (once per node), exit 2, without torch's ``ChildFailedError`` report;
- any other worker failure (an exception, a signal) is one line naming the rank, its exit code
  or signal and where its output is, exit 1; the worker's own traceback stays in its output.

torch is imported only when the command runs, so ``accel --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RAW_ARGS = True  # torchrun's options and the train arguments are parsed here

USAGE = "accel launch [LAUNCHER OPTIONS] [train] [RUN_CONFIG] [TRAIN FLAGS ...]"
DESCRIPTION = """\
Run `accel train` on several processes (and machines) with torch's launcher (torchrun).
The launcher options are torchrun's; the train arguments follow, after the word `train`
(which may be left out when a run config file comes next). The train arguments are
checked before any process starts: a mistake is one `accel: error:` line (exit 2), also
when only the workers can see it; a crashed worker is named with its exit code (exit 1)."""
EPILOG = """examples:
  accel launch --nproc_per_node 2 run.json --max_steps 10
  accel launch --nproc_per_node 2 train --demo
  accel launch --nproc_per_node 8 --nnodes 2 --node_rank 0 --master_addr HOST \\
      --master_port 29500 train run.json        (and --node_rank 1 on the second machine)"""

#: set in the workers' environment: their user errors go to the launcher, not to the console
LAUNCHED_ENV = "ACCEL_LAUNCH"
#: key of a worker's error file that marks the failure as a user error (exit 2)
USER_ERROR_KEY = "accel_user_error"
USER_ERROR_EXIT = 2

_NOT_OURS = {  # torchrun options that launch something else than `accel train`
    "module": "-m/--module",
    "no_python": "--no_python",
    "run_path": "--run_path",
}


def run_launch(argv: Sequence[str]) -> int:
    argv = list(argv)
    parser = _launcher_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    args, train_args = parse_launch(parser, argv)
    if any(a in ("-h", "--help") for a in train_args):
        from accel.trainer.parsing import build_parser

        build_parser().print_help()
        return 0
    check_train_arguments(train_args)
    args.module, args.training_script = True, "accel.cli"
    args.training_script_args = ["train", *train_args]
    _prepare_worker_environment(args)
    return _launch(args)


run = run_launch


def _launcher_parser() -> Any:
    """torchrun's own parser, speaking as ``accel launch``: no abbreviations, and errors are
    one ConfigError line."""
    from torch.distributed.run import get_args_parser

    from accel.errors import ConfigError, raise_argparse_error

    parser = get_args_parser()
    parser.prog, parser.usage, parser.allow_abbrev = "accel launch", USAGE, False
    parser.description, parser.epilog = DESCRIPTION, EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._actions:
        if action.dest == "training_script":
            action.metavar, action.help = "train", "`train`, or the run config file"
        elif action.dest == "training_script_args":
            action.metavar, action.help = "...", "the run config file and flags of `accel train`"
        elif action.dest in _NOT_OURS:
            action.help = argparse.SUPPRESS  # accel launch runs `accel train` only

    def error(message: str) -> None:
        if message.startswith("the following arguments are required"):
            raise ConfigError(f"nothing to launch: add `train` and its arguments: {USAGE}")
        raise_argparse_error(message, "accel launch")

    parser.error = error
    return parser


def parse_launch(parser: Any, argv: list[str]) -> tuple[Any, list[str]]:
    """``(torchrun's namespace, the train arguments)``. torchrun's parser takes the first word
    that is not one of its options as the program; here that is ``train`` or the run config
    file, and everything after it belongs to the trainer."""
    from accel.errors import ConfigError, did_you_mean
    from accel.trainer.parsing import CONFIG_SUFFIXES

    args, unknown = parser.parse_known_args(argv)
    if unknown:
        bad = unknown[0].split("=")[0]
        if bad in _train_options():
            raise ConfigError(
                f"'{bad}' is an option of `accel train`: the train arguments come after the "
                f"word `train` (or the run config file): {USAGE}"
            )
        options = [o for o in parser._option_string_actions if o.startswith("--")]
        raise ConfigError(
            f"unknown launcher option '{unknown[0]}'.{did_you_mean(bad, options)} "
            "Run `accel launch --help` for the launcher options."
        )
    for dest, flag in _NOT_OURS.items():
        if getattr(args, dest, False):
            raise ConfigError(
                f"{flag}: accel launch always runs `accel train`; use torchrun to launch "
                "another program"
            )
    first, rest = args.training_script, list(args.training_script_args)
    if first == "train":
        return args, rest
    if first.endswith(CONFIG_SUFFIXES) or Path(first).is_file():
        return args, [first, *rest]
    raise ConfigError(
        f"'{first}': expected `train` or a run config file ({', '.join(CONFIG_SUFFIXES)}) after "
        f"the launcher options: {USAGE}"
    )


def _train_options() -> set[str]:
    from accel.trainer.parsing import build_parser

    return {o for a in build_parser()._actions for o in a.option_strings}


def check_train_arguments(train_args: Sequence[str]) -> None:
    """The checks ``accel train`` runs before anything heavy loads (arguments, run config
    file, values, paths, data files, model folder), here, before any worker starts. Those
    that need the launch itself (process count, devices) run in the workers."""
    from accel.discovery import discover
    from accel.trainer.parsing import parse_argv
    from accel.trainer.preflight import check_before_loading

    # the workers name skipped plugins themselves; the launcher stays quiet about them
    check_before_loading(parse_argv(train_args, discover().plugins))


def _prepare_worker_environment(args: Any) -> None:
    """What the workers inherit: the user-error hand-over switch, and accel's CPU thread
    defaults worked out for the number of workers per node (this process filled them in for
    one process; the user's own settings stay as they are)."""
    from torch.distributed.run import determine_local_world_size

    from accel.errors import ConfigError
    from accel.threads import FILLED_BY_LAUNCHER, configure, environment_for

    try:
        local = determine_local_world_size(args.nproc_per_node)
    except ValueError as err:
        raise ConfigError(f"--nproc_per_node: {err}") from None
    for name in configure().filled_in:
        os.environ.pop(name, None)
    before = set(os.environ)
    environment_for(os.environ, processes=local)  # also keeps torchrun from forcing 1 thread
    os.environ[FILLED_BY_LAUNCHER] = ",".join(sorted(set(os.environ) - before))
    os.environ[LAUNCHED_ENV] = "1"


def _launch(args: Any) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import run as torch_run

    _quiet_agent_logs()
    try:
        torch_run(args)
    except ChildFailedError as err:
        return report_failures(err.failures, args)
    except SignalException as err:
        print(f"accel: launch stopped by {err.sigval.name}", file=sys.stderr)
        return 128 + int(err.sigval)
    except RendezvousError as err:
        print(f"accel: launch failed: the processes could not meet ({err})", file=sys.stderr)
        return 1
    return 0


def _quiet_agent_logs() -> None:
    """The agent logs each failure and each worker it stops; :func:`report_failures` says it
    in one line instead. ``LOGLEVEL`` (torch's own switch) set by the user wins."""
    if "LOGLEVEL" in os.environ:
        return
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def report_failures(failures: dict[int, Any], args: Any) -> int:
    """One line for the failed launch, and its exit status.

    ``failures`` is in the order the agent saw the workers end (it stops the rest with
    SIGTERM as soon as one fails). A user error is printed as the workers would have printed
    it, ``accel: error: ...``, exit 2, unless a worker crashed in an earlier second (then
    that crash is the cause, not a consequence). Otherwise the first worker that ended on its
    own is named with its exit code or signal, exit 1."""
    ordered = sorted(failures.items(), key=lambda item: item[1].timestamp)  # stable
    user = [(rank, f) for rank, f in ordered if _user_error(f) is not None]
    others = [(rank, f) for rank, f in ordered if _user_error(f) is None]
    if user and not any(f.timestamp < user[0][1].timestamp for _, f in others):
        for line in (_user_error(user[0][1]) or "").splitlines() or [""]:  # one per problem
            print(f"accel: error: {line}", file=sys.stderr)
        return USER_ERROR_EXIT
    on_their_own = [(rank, f) for rank, f in others if f.exitcode != -signal.SIGTERM]
    rank, failure = (on_their_own or others)[0]
    how = (
        f"was killed by signal {failure.signal_name()}"
        if failure.exitcode < 0
        else f"exited with code {failure.exitcode}"
    )
    rest = len(failures) - 1
    stopped = f" ({rest} other worker(s) stopped too)" if rest else ""
    print(
        f"accel: worker failed: rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) "
        f"{how}{stopped}. {_where_output_is(args, failure.local_rank)}",
        file=sys.stderr,
    )
    return 1


def _user_error(failure: Any) -> str | None:
    data = failure.error_file_data
    if failure.exitcode == USER_ERROR_EXIT and isinstance(data, dict) and data.get(USER_ERROR_KEY):
        return str(data.get("message", ""))
    return None


def _where_output_is(args: Any, local_rank: int) -> str:
    """The worker's stderr file when torchrun was asked to keep one, else the console."""
    kept = getattr(args, "log_dir", None) and (args.redirects != "0" or args.tee != "0")
    if kept:
        logs = sorted(
            Path(args.log_dir).glob(f"*/attempt_*/{local_rank}/stderr.log"),
            key=lambda p: p.stat().st_mtime,
        )
        if logs:
            return f"Its output: {logs[-1]}"
        return f"Its output is under {args.log_dir}"
    return "Its traceback, if any, is in the output above."


def hand_to_launcher(message: str) -> bool:
    """In a worker of ``accel launch``: write a user error to torch's error file of this
    worker, where the launcher reads it and prints it once. False (print it here, as usual)
    anywhere else, e.g. under plain torchrun."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE", "")
    if os.environ.get(LAUNCHED_ENV) != "1" or not path:
        return False
    record = {"message": message, "timestamp": int(time.time()), USER_ERROR_KEY: True}
    try:
        Path(path).write_text(json.dumps(record))
    except OSError:
        return False
    return True
