"""Start Flower safely: ``python -m core.flower`` (console script ``daytrader-flower``).

Reads ``TRADING_FLOWER_USER``, ``TRADING_FLOWER_PASSWORD``, ``TRADING_FLOWER_PORT``,
``TRADING_FLOWER_ADDRESS`` and ``TRADING_FLOWER_UNAUTHENTICATED_LOCALHOST`` and replaces this
process with ``celery -A tasks flower --address=ADDRESS --port=PORT``, basic auth on.

- The login is handed to Flower in its ``FLOWER_BASIC_AUTH`` environment variable (Flower
  reads ``FLOWER_<OPTION>`` variables), never on the command line, so it is not in the
  process list, and it is never printed or logged.
- Without a user and a password it refuses to start (exit status 2), except when
  ``TRADING_FLOWER_UNAUTHENTICATED_LOCALHOST=true`` *and* the address is a loopback one. A
  non-loopback address without a login is always refused.
- Flower's HTTP API (``/api/*``) answers 401 without the login; ``FLOWER_UNAUTHENTICATED_API``
  is removed from Flower's environment so it can never be opened without one.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.errors import ConfigError

if TYPE_CHECKING:
    from core.config import Settings

EXIT_REFUSED = 2
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost",
                            "ip6-loopback"})


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the usual names of the loopback host. The empty address
    (Flower's "all interfaces"), 0.0.0.0, :: and any other name are not loopback."""
    host = address.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class FlowerPlan:
    """What to start: address, port and the login (``None`` only on loopback, by opt-in)."""

    address: str
    port: int
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def authenticated(self) -> bool:
        return self.user is not None and self.password is not None

    def argv(self) -> list[str]:
        """The Flower command line (no secret in it)."""
        return [sys.executable, "-m", "celery", "-A", "tasks", "flower",
                f"--address={self.address}", f"--port={self.port}"]

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        """Flower's environment: ``base`` with the login in ``FLOWER_BASIC_AUTH``, without
        ``FLOWER_UNAUTHENTICATED_API`` and without ``TRADING_FLOWER_PASSWORD``."""
        env = {k: v for k, v in base.items()
               if k not in ("FLOWER_UNAUTHENTICATED_API", "TRADING_FLOWER_PASSWORD")}
        if self.authenticated:
            env["FLOWER_BASIC_AUTH"] = f"{self.user}:{self.password}"
        return env


def plan_flower(user: str | None, password: str | None, address: str, port: int,
                unauthenticated_localhost: bool = False) -> FlowerPlan:
    """Check the Flower settings; raise ConfigError saying why Flower must not start."""
    user = (user or "").strip() or None
    password = password or None
    address = address.strip()
    where = f"address {address!r}" if address else "all interfaces (empty address)"
    if user is None and password is None:
        if not unauthenticated_localhost:
            raise ConfigError(
                "Flower needs a login: set TRADING_FLOWER_USER and TRADING_FLOWER_PASSWORD "
                "(or, on a loopback address only, TRADING_FLOWER_UNAUTHENTICATED_LOCALHOST=true)")
        if not is_loopback(address):
            raise ConfigError(
                f"Flower without a login is allowed on a loopback address only, not on {where}"
                ": set TRADING_FLOWER_USER and TRADING_FLOWER_PASSWORD")
        return FlowerPlan(address, port)
    if user is None:
        raise ConfigError("TRADING_FLOWER_PASSWORD is set but TRADING_FLOWER_USER is not")
    if password is None:
        raise ConfigError("TRADING_FLOWER_USER is set but TRADING_FLOWER_PASSWORD is not")
    # FLOWER_BASIC_AUTH is "user:password[,user:password...]": Flower splits it on commas and
    # compares the whole "user:password" string with what the browser sends.
    if ":" in user or "," in user or any(c.isspace() for c in user):
        raise ConfigError("TRADING_FLOWER_USER must not contain ':', ',' or spaces")
    if "," in password or any(c in password for c in "\r\n\0"):
        raise ConfigError("TRADING_FLOWER_PASSWORD must not contain ',' or line breaks")
    return FlowerPlan(address, port, user, password)


def plan_from_settings(settings: Settings | None = None) -> FlowerPlan:
    """The plan for the ``TRADING_FLOWER_*`` settings (read now when not given)."""
    if settings is None:
        from core.config import load_settings

        settings = load_settings()
    secret = settings.flower_password
    return plan_flower(settings.flower_user,
                       secret.get_secret_value() if secret is not None else None,
                       settings.flower_address, settings.flower_port,
                       settings.flower_unauthenticated_localhost)


def main(argv: list[str] | None = None) -> int:
    """Check the settings and exec Flower; 2 (and a message on stderr) when refused."""
    parser = argparse.ArgumentParser(
        prog="daytrader-flower", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true",
                        help="only check the settings and print what would start")
    args = parser.parse_args(argv)
    try:
        plan = plan_from_settings()
    except ConfigError as exc:
        print(f"daytrader-flower: refusing to start Flower: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    login = (f"basic auth for user {plan.user!r}" if plan.authenticated
             else "NO login (TRADING_FLOWER_UNAUTHENTICATED_LOCALHOST, loopback only)")
    print(f"daytrader-flower: Flower on {plan.address or '*'}:{plan.port}, {login}",
          file=sys.stderr, flush=True)
    if args.check:
        return 0
    command = plan.argv()
    os.execve(command[0], command, plan.env(os.environ))
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
