import pytest

from discovery.cli.main import build_parser

COMMANDS = [["network", "create"], ["network", "ls"], ["network", "inspect"], ["network", "rm"],
            ["service", "create"], ["service", "ls"], ["service", "inspect"], ["service", "rm"],
            ["run"], ["attach"], ["exec"], ["ps"], ["rm"], ["agent"], ["sidecar"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"svcnet {' '.join(command)}" in out


def test_global_options_work_after_the_command():
    args = build_parser().parse_args(["network", "ls", "--prefix", "/x", "--format", "json"])
    assert args.prefix == "/x" and args.format == "json"


def test_resolver_options_explain_their_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["agent", "--help"])
    out = capsys.readouterr().out
    for text in ("--upstream IP[:PORT]", "resolv.conf", "--ttl-vip", "default 600", "--max-inflight",
                 "--metrics-addr", "Docker waits 4"):
        assert text in out, text


@pytest.mark.parametrize("argv", [
    ["--prefix", "/x", "--state-dir", "/s", "ps"],
    ["ps", "--prefix", "/x", "--state-dir", "/s"],
    ["--prefix", "/x", "network", "ls", "--state-dir", "/s"],
], ids=["before", "after", "both"])
def test_global_options_before_or_after_the_command(argv):
    args = build_parser().parse_args(argv)
    assert args.prefix == "/x" and str(args.state_dir) == "/s"


def test_restart_policy_is_an_option_of_run():
    args = build_parser().parse_args(["run", "-d", "--name", "a", "--network", "n", "--restart", "on-failure:3",
                                      "--", "true"])
    assert args.restart == "on-failure:3"
