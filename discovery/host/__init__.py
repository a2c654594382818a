"""Kernel plumbing on one host: netns, bridges and veths (``netlink``), running a command
inside a sandbox (``nsexec``, standard library only so the CLI can use it), a sandbox's
lifecycle and its record on disk (``sandbox``), the isolation/NAT chains (``firewall``) and
shared python-iptables use (``xtables``).

Uses ``state`` only.
"""
