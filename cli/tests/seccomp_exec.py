#!/usr/bin/python3
"""Applies a Docker-format seccomp profile (deny by default, an allow list) to this process,
then execs the rest of the command line under it: what `docker run --security-opt
seccomp=PROFILE` does, without a Docker engine. Used by cli/tests/deploy.rs.

usage: seccomp_exec.py PROFILE.json PROGRAM [ARG...]
"""
import errno
import json
import os
import sys

import seccomp  # Debian: python3-seccomp

profile = json.load(open(sys.argv[1]))
if profile["defaultAction"] != "SCMP_ACT_ERRNO":
    sys.exit("only deny-by-default profiles are supported")
ret = profile.get("defaultErrnoRet", errno.EPERM)
allowed = seccomp.SyscallFilter(defaction=seccomp.ERRNO(ret))
for rule in profile["syscalls"]:
    if rule["action"] != "SCMP_ACT_ALLOW" or rule.get("args"):
        sys.exit(f"unsupported rule {rule}")
    for name in rule["names"]:
        try:
            allowed.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError):
            pass  # not a syscall of this architecture
allowed.load()  # sets no_new_privs first
os.execv(sys.argv[2], sys.argv[2:])
