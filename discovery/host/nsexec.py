"""Run a command inside a sandbox: its netns, its resolv.conf and hosts, its hostname.

Like ``ip netns exec`` (and Docker's container setup) the command gets a private mount
namespace in which the sandbox's resolv.conf and hosts file are bind-mounted over
/etc/resolv.conf and /etc/hosts, and a private UTS namespace for its hostname. Usable as
``python -m discovery.host.nsexec --netns PATH [...] -- CMD ARGS`` or in-process via ``enter``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_SLAVE = 1 << 19
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def enter(netns: str, resolv_conf: str | None = None, hosts: str | None = None,
          hostname: str | None = None) -> None:
    """Move the calling (single-threaded) process into the sandbox."""
    fd = os.open(netns, os.O_RDONLY)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns {netns}")
    finally:
        os.close(fd)
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare")
    # Our bind mounts must not propagate back to the host.
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None), "make / a slave mount")
    for source, target in ((resolv_conf, "/etc/resolv.conf"), (hosts, "/etc/hosts")):
        if source:
            real_target = os.path.realpath(target)
            if os.path.exists(real_target):
                _check(_libc.mount(source.encode(), real_target.encode(), None, MS_BIND, None),
                       f"bind {source} on {target}")
    # /sys shows the interfaces of the netns that mounted it: remount for the sandbox's.
    if _libc.umount2(b"/sys", MNT_DETACH) == 0:
        _libc.mount(b"sysfs", b"/sys", b"sysfs", 0, None)
    if hostname:
        name = hostname.encode()
        _check(_libc.sethostname(name, len(name)), "sethostname")


def argv(netns: str, command: list[str], resolv_conf: str | None = None, hosts: str | None = None,
         hostname: str | None = None, exit_file: str | None = None) -> list[str]:
    """The command line that runs ``command`` in a sandbox through this module.

    With ``exit_file`` this process stays as the command's parent (a shim, as containerd's
    is for Docker) and writes the command's exit status there: whoever started it may be
    gone (an agent restart) and still learn how it ended.
    """
    options = []
    for flag, value in (("--resolv-conf", resolv_conf), ("--hosts", hosts), ("--hostname", hostname),
                        ("--exit-file", exit_file)):
        if value:
            options += [flag, value]
    return [sys.executable, "-m", "discovery.host.nsexec", "--netns", netns, *options, "--", *command]


def sandbox_argv(record: dict, command: list[str]) -> list[str]:
    """For a sandbox record as the API returns it; someone else's netns keeps its own files."""
    if not record["owns_netns"]:
        return argv(record["netns"], command)
    files = record["files"]
    return argv(record["netns"], command, files["resolv_conf"], files["hosts"], record["hostname"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m discovery.host.nsexec",
                                     description="Run COMMAND inside a svcnet sandbox.")
    parser.add_argument("--netns", required=True)
    parser.add_argument("--resolv-conf")
    parser.add_argument("--hosts")
    parser.add_argument("--hostname")
    parser.add_argument("--exit-file", help="stay as the parent and write the exit status here")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a COMMAND after --")
    try:
        enter(args.netns, args.resolv_conf, args.hosts, args.hostname)
        if args.exit_file:
            sys.exit(_supervise(command, args.exit_file))
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"svcnet: cannot run {command[0]!r} in the sandbox: {exc}", file=sys.stderr)
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        if args.exit_file:
            _write_exit(args.exit_file, code)
        sys.exit(code)


FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _supervise(command: list[str], exit_file: str) -> int:
    """Run ``command`` as our child, pass signals on, record how it ended; return its code."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvp(command[0], command)
        except OSError as exc:
            os.write(write_end, f"{127 if isinstance(exc, FileNotFoundError) else 126} {exc}".encode())
        os._exit(127)
    os.close(write_end)
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda signum, frame: _pass_on(child, signum))
    failure = os.read(read_end, 4096).decode()  # empty once exec closed the pipe
    os.close(read_end)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    code = int(failure.split()[0]) if failure else os.waitstatus_to_exitcode(status)
    if failure:
        print(f"svcnet: cannot run {command[0]!r} in the sandbox: {failure.split(' ', 1)[1]}", file=sys.stderr)
    code = code if code >= 0 else 128 - code  # killed by signal N -> 128+N, as a shell says
    _write_exit(exit_file, code)
    return code


def _pass_on(child: int, signum: int) -> None:
    try:
        os.kill(child, signum)
    except ProcessLookupError:
        pass


def _write_exit(path: str, code: int) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as out:
        out.write(f"{code}\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
