"""``exo-remote doctor``: what stands between this machine and a working remote node, each
failure with its fix.

On an exo node (the default) it checks the sidecar's reachability one layer at a time
(address, name, port, TLS and the certificate's dates against this clock, token, an
answered call), exo's environment (classic exo installed, its pins intact, the startup
trigger installed and run, the add-on's hooks fitting this exo) and what the sidecar
offers this node (ready models, budget). ``--host`` checks the sidecar host instead
(:mod:`~exo_remote_engine.cli.doctor_host`). Exit status 0 when nothing failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import re
import site
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from exo_remote_engine.cli.connection_hints import sidecar_hint, speaks_tls
from exo_remote_engine.cli.doctor_report import TIMEOUT_S, Check, render
from exo_remote_engine.contract.addresses import TargetKind
from exo_remote_engine.contract.errors import RemoteError
from exo_remote_engine.engine.connection.client import SidecarClient
from exo_remote_engine.engine.connection.target import SidecarTarget
from exo_remote_engine.generated import remote_inference_pb2 as pb

STARTUP_FILE = "exo_remote_engine.pth"
EXO_COMMIT = "e4238f9ef"


def run(args: argparse.Namespace, target: SidecarTarget | None, target_error: str | None) -> int:
    """The ``doctor`` command: prints the checks and returns the exit status."""
    if args.host:
        from exo_remote_engine.cli.doctor_host import host_checks

        checks = host_checks(args.config, args.state_dir, args.redis, args.database)
    else:
        checks = node_checks(target, target_error, args.skip_exo)
    print(render(checks))
    return 1 if any(c.ok is False for c in checks) else 0


# --------------------------------------------------------------------------- the sidecar, seen from here


def node_checks(target: SidecarTarget | None, target_error: str | None, skip_exo: bool = False) -> list[Check]:
    checks: list[Check] = []
    if target is None:
        fix = "set EXO_REMOTE_SIDECAR=host:port (or pass --sidecar host:port)"
        return [Check("sidecar address", False, target_error or "not set", fix), *_exo_checks(skip_exo)]
    checks.append(Check("sidecar address", True, target.address))
    reachable = _network_checks(target, checks)
    if reachable:
        checks += _tls_checks(target)
        checks += asyncio.run(_call_checks(target))
    return [*checks, *_exo_checks(skip_exo)]


def _hosts(target: SidecarTarget) -> list[tuple[str, int]]:
    parsed = target.parsed
    named = parsed.hosts or ((parsed.dns_name,) if parsed.dns_name else ())
    found = []
    for hostport in named:
        host, _, port = hostport.rpartition(":")
        found.append((host.strip("[]"), int(port)))
    return found


def _network_checks(target: SidecarTarget, checks: list[Check]) -> bool:
    if target.parsed.kind is TargetKind.SOCKET:
        checks.append(Check("name and port", None, "a socket address: the call below tells"))
        return True
    reachable = True
    for host, port in _hosts(target):
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            fix = f"use the sidecar host's IP address, or make {host!r} resolve here (DNS or /etc/hosts)"
            checks.append(Check(f"name {host}", False, f"does not resolve ({exc.strerror})", fix))
            reachable = False
            continue
        addresses = sorted({str(info[4][0]) for info in infos})
        checks.append(Check(f"name {host}", True, "resolves to " + ", ".join(addresses)))
        try:
            with socket.create_connection((host, port), timeout=TIMEOUT_S):
                checks.append(Check(f"port {host}:{port}", True, "accepts connections"))
        except OSError as exc:
            if host in ("127.0.0.1", "::1", "localhost"):
                fix = f"start exo-remote-sidecar on this machine (--listen {host}:{port}), or point at the sidecar host"
            else:
                fix = (
                    f"on {host}, start exo-remote-sidecar with --listen 0.0.0.0:{port} (its default, 127.0.0.1, "
                    "serves that machine only) and open the port in its firewall"
                )
            checks.append(Check(f"port {host}:{port}", False, f"no connection ({exc.strerror or exc})", fix))
            reachable = False
    return reachable


def _tls_checks(target: SidecarTarget) -> list[Check]:
    """The handshake with the configured CA, and the certificate's dates against this clock
    (a clock behind or ahead makes a valid certificate fail)."""
    hosts = _hosts(target)
    if not hosts:
        return []
    host, port = hosts[0]
    if target.tls is None or target.tls.ca_file is None:
        if speaks_tls(f"{host}:{port}", TIMEOUT_S):
            fix = "set EXO_REMOTE_TLS_CA to the CA file that signed the sidecar's certificate"
            return [Check("TLS", False, f"the sidecar at {host}:{port} speaks TLS and no CA is set", fix)]
        return [
            Check("TLS", None, "plaintext (no EXO_REMOTE_TLS_CA); fine on loopback or a private network"),
            Check("clock", None, "nothing to compare with on a plaintext sidecar (certificate dates need TLS)"),
        ]
    context = ssl.create_default_context(cafile=str(target.tls.ca_file))
    if target.tls.cert_file is not None:
        context.load_cert_chain(str(target.tls.cert_file), str(target.tls.key_file) if target.tls.key_file else None)
    name = target.tls.server_name or host
    context.check_hostname = False  # the name is checked below, to say which one failed
    try:
        with (
            socket.create_connection((host, port), timeout=TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname=name) as wrapped,
        ):
            cert = wrapped.getpeercert() or {}
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or str(exc)
        if "not yet valid" in reason or "expired" in reason:
            fix = "set this machine's clock (e.g. timedatectl set-ntp true), or renew the sidecar's certificate"
            return [Check("clock", False, f"the sidecar's certificate is {reason} by this machine's clock", fix)]
        return [Check("TLS", False, f"certificate not accepted: {reason}", "check EXO_REMOTE_TLS_CA")]
    except (OSError, ssl.SSLError) as exc:
        return [Check("TLS", False, f"handshake failed: {exc}", "check that the sidecar has --tls-cert/--tls-key")]
    checks = [Check("TLS", True, f"handshake with {host}:{port}, certificate signed by EXO_REMOTE_TLS_CA")]
    alt_names: Any = cert.get("subjectAltName", ())
    names = [str(value) for kind, value in alt_names if kind in ("DNS", "IP Address")]
    if names and name not in names:
        fix = f"set EXO_REMOTE_TLS_SERVER_NAME to one of {', '.join(names)}, or dial the sidecar by that name"
        checks.append(Check("TLS name", False, f"the certificate names {', '.join(names)}, not {name}", fix))
    if "notAfter" in cert:
        left = ssl.cert_time_to_seconds(str(cert["notAfter"])) - time.time()
        checks.append(Check("clock", True, f"within the certificate's dates (expires in {left / 86400:.0f} days)"))
    return checks


async def _call_checks(target: SidecarTarget) -> list[Check]:
    from dataclasses import replace

    client = SidecarClient(replace(target, deadline_s=TIMEOUT_S * 2))
    try:
        listing = await client.list_models()
    except RemoteError as exc:
        hint = sidecar_hint(exc, target) or "see the sidecar's log"
        name = "authentication" if exc.reason.value == "UNAUTHENTICATED" else "sidecar call"
        return [Check(name, False, f"{exc.reason.value}: {exc.message}", hint)]
    finally:
        await client.close()
    token = "the token was accepted" if target.token else "no token set, and the sidecar asks for none"
    return [Check("authentication", True, token), *_offer_checks(listing)]


def _offer_checks(listing: pb.ListModelsResponse) -> list[Check]:
    ready = [m.alias for m in listing.models if m.ready]
    checks = []
    if ready:
        default = f"; default {listing.default_model}" if listing.default_model else ""
        checks.append(
            Check(
                "models",
                True,
                f"{len(ready)} ready ({', '.join(ready[:3])}{', ...' if len(ready) > 3 else ''}){default}",
            )
        )
    else:
        reasons = sorted({m.not_ready_reason for m in listing.models if m.not_ready_reason})
        fix = "; ".join(reasons) or "give the sidecar a --config with models (docs/exo.md#sidecar-configuration)"
        checks.append(Check("models", False, "none ready", fix))
    if listing.HasField("budget"):
        b = listing.budget
        detail = f"node {b.node}: ${b.remaining_usd:.6f} left of ${b.max_usd:g}"
        fix = "wait for the budget to reset, or raise this node's max_budget in the sidecar's config"
        checks.append(Check("budget", b.remaining_usd > 0, detail, fix))
    else:
        checks.append(Check("budget", None, "no budget set for this node"))
    return checks


# --------------------------------------------------------------------------- exo's environment


def _exo_checks(skip: bool) -> list[Check]:
    if skip:
        return [Check("exo", None, "not checked (--skip-exo)")]
    try:
        version = importlib.metadata.version("exo")
    except importlib.metadata.PackageNotFoundError:
        fix = (
            f"run exo-remote doctor with exo's own Python ({sys.executable} has no exo), or install classic exo "
            f"(commit {EXO_COMMIT}) and then `pip install exo-remote-engine` into that environment"
        )
        return [Check("exo", False, "classic exo is not installed in this Python", fix)]
    return [Check("exo", True, f"exo {version} in {sys.prefix}"), _pins_check(), _trigger_check(), _hooks_check()]


def _pins_check() -> Check:
    changed = []
    for requirement in importlib.metadata.requires("exo") or []:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^;\s]+)\s*(;.*)?", requirement)
        if match is None or (match.group(3) and "Linux" in match.group(3) and sys.platform != "linux"):
            continue
        name, pinned = match.group(1), match.group(2)
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # optional hardware packages exo never imports on this machine
        if installed != pinned:
            changed.append((name, installed, pinned))
    if not changed:
        return Check("exo's pins", True, "every pinned package exo needs is at exo's version")
    listed = ", ".join(f"{n} {i} (exo pins {p})" for n, i, p in changed)
    fix = "pip install " + " ".join(f"'{n}=={p}'" for n, _, p in changed)
    return Check("exo's pins", False, listed, fix)


def _trigger_check() -> Check:
    places = [Path(p) for p in [*site.getsitepackages(), site.getusersitepackages()]]
    found = [p / STARTUP_FILE for p in places if (p / STARTUP_FILE).is_file()]
    fix = "pip install exo-remote-engine (a wheel install, not -e) into exo's environment"
    if not found:
        return Check("startup trigger", False, f"no {STARTUP_FILE} in {', '.join(map(str, places))}", fix)
    if "exo_remote_engine._startup" not in sys.modules:
        return Check("startup trigger", False, f"{found[0]} is there but did not run (python -S?)", fix)
    return Check("startup trigger", True, f"{found[0]} runs at interpreter start")


_PLAN = (
    "import json; from exo_remote_engine.engine.exo_hooks import build_plan; "
    "print(json.dumps(build_plan(True).missing()))"
)


def _hooks_check() -> Check:
    """In a child process: resolving the plan imports exo's modules."""
    fix = f"use classic exo at commit {EXO_COMMIT} (the add-on patches its functions by name)"
    try:
        done = subprocess.run([sys.executable, "-c", _PLAN], capture_output=True, text=True, timeout=120, check=False)
        missing = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        missing = None
    if missing is None:
        return Check("exo hooks", False, "could not check exo against the add-on's hooks", fix)
    if missing:
        return Check("exo hooks", False, f"this exo lacks {len(missing)} things the add-on hooks: {missing[0]}", fix)
    return Check("exo hooks", True, "every function the add-on patches is there, with the parameters it passes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", action="store_true", help="check this machine as the sidecar host, not as an exo node (default: off)"
    )
    parser.add_argument("--skip-exo", action="store_true", help="on a node, leave exo's environment out (default: off)")
    parser.add_argument("--config", type=Path, help="with --host: the sidecar's --config (default: EXO_REMOTE_CONFIG)")
    parser.add_argument(
        "--state-dir", type=Path, help="with --host: the sidecar's --state-dir (default: EXO_REMOTE_STATE_DIR, ...)"
    )
    parser.add_argument("--redis", metavar="URL", help="with --host: the sidecar's --redis (default: EXO_REMOTE_REDIS)")
    parser.add_argument(
        "--database", metavar="URL", help="with --host: the sidecar's --database (default: EXO_REMOTE_DATABASE)"
    )
