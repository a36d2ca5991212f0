"""``--xattrmap``: extended attribute names as the guest sees them vs the host.

virtiofsd's syntax.  A map is a list of rules; each rule's first non-blank
character is its field separator::

    :type:scope:key:prepend:

``scope``  ``client`` (names the guest sends: set/get/remove), ``server``
           (names the host lists: listxattr) or ``all``.
``type``   ``prefix``: a client name starting with ``key`` goes to the host
           as ``prepend + name``; a host name starting with ``prepend`` is
           listed with ``prepend`` stripped.
           ``ok``: the name passes unchanged.
           ``bad``: a client name starting with ``key`` is refused (EPERM;
           getxattr answers ENODATA), a host name starting with ``prepend``
           is hidden.
           ``unsupported``: as ``bad`` but ENOTSUP.
``:map:key:prepend:`` is short for ``:prefix:all:key:prepend:
:bad:server::key: :bad:client:prepend:: :ok:all:::`` (with an empty key:
``:prefix:all::prepend: :bad:all:::``).

The first matching rule decides; a name no rule matches is refused
(client) or hidden (server), so a map should end with a catch-all.

Privileged names, with or without a map (the safe default): a request from a
guest uid other than 0 may not set or remove a host name in ``trusted.`` or
``security.`` (EPERM, what the host kernel answers an unprivileged local
caller).  Guest root may set ``security.capability`` (the daemon keeps
CAP_SETFCAP); ``trusted.*`` and other ``security.*`` names need
CAP_SYS_ADMIN, which the daemon drops, so they fail for everyone unless a
map moves them elsewhere, e.g. ``:prefix:all:trusted.:user.virtiofs.trusted.:``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["IDENTITY", "XattrMap", "XattrMapError", "XattrRule", "parse", "privileged_write_denied"]

_TYPES = ("prefix", "ok", "bad", "unsupported", "map")
_SCOPES = ("client", "server", "all")
_PRIVILEGED = (b"trusted.", b"security.")


class XattrMapError(ValueError):
    """An ``--xattrmap`` string that does not parse."""


@dataclass(frozen=True)
class XattrRule:
    type: str
    client: bool
    server: bool
    key: bytes
    prepend: bytes


def _expand(type_: str, scope: str, key: bytes, prepend: bytes) -> list[XattrRule]:
    if type_ != "map":
        if scope not in _SCOPES:
            raise XattrMapError(f"unknown scope {scope!r} (client, server or all)")
        return [XattrRule(type_, scope != "server", scope != "client", key, prepend)]
    if not key:
        return [
            XattrRule("prefix", True, True, b"", prepend),
            XattrRule("bad", True, True, b"", b""),
        ]
    return [
        XattrRule("prefix", True, True, key, prepend),
        XattrRule("bad", False, True, b"", key),
        XattrRule("bad", True, False, prepend, b""),
        XattrRule("ok", True, True, b"", b""),
    ]


def parse(text: str) -> tuple[XattrRule, ...]:
    """The rules of an ``--xattrmap`` string."""
    rules: list[XattrRule] = []
    rest = text.strip()
    if not rest:
        raise XattrMapError("empty xattr map")
    while rest:
        sep = rest[0]
        if sep.isalnum() or sep == ".":
            raise XattrMapError(f"bad separator {sep!r}")
        arity = 4 if rest[1:].startswith(f"map{sep}") else 5
        parts = rest[1:].split(sep, arity - 1)
        if len(parts) < arity:
            raise XattrMapError(f"rule {rest!r} has too few fields")
        *fields, rest = parts
        rest = rest.lstrip()
        type_ = fields[0]
        if type_ not in _TYPES:
            raise XattrMapError(f"unknown rule type {type_!r}")
        if type_ == "map":
            scope, key, prepend = "all", fields[1], fields[2]
        else:
            scope, key, prepend = fields[1], fields[2], fields[3]
        rules.extend(_expand(type_, scope, os.fsencode(key), os.fsencode(prepend)))
    return tuple(rules)


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class XattrMap:
    """Translation both ways; :data:`IDENTITY` when no ``--xattrmap`` is given."""

    def __init__(self, rules: Iterable[XattrRule] | None = None) -> None:
        self.rules: tuple[XattrRule, ...] | None = None if rules is None else tuple(rules)

    @classmethod
    def from_option(cls, text: str | None) -> XattrMap:
        return IDENTITY if text is None else cls(parse(text))

    def to_host(self, name: bytes, *, getting: bool = False) -> bytes:
        """The host name for a guest name, or OSError (EPERM, ENODATA, ENOTSUP)."""
        if self.rules is None:
            return name
        for rule in self.rules:
            if not rule.client or not name.startswith(rule.key):
                continue
            if rule.type == "prefix":
                return rule.prepend + name
            if rule.type == "ok":
                return name
            if rule.type == "unsupported":
                raise _oserror(errno.ENOTSUP)
            break  # bad
        raise _oserror(errno.ENODATA if getting else errno.EPERM)

    def to_guest(self, name: bytes) -> bytes | None:
        """The name the guest lists for a host name; None hides it."""
        if self.rules is None:
            return name
        for rule in self.rules:
            if not rule.server or not name.startswith(rule.prepend):
                continue
            if rule.type == "prefix":
                stripped = name[len(rule.prepend) :]
                return stripped or None
            if rule.type == "ok":
                return name
            return None  # bad, unsupported
        return None


IDENTITY = XattrMap()


def privileged_write_denied(host_name: bytes, uid: int) -> bool:
    """Whether a guest caller ``uid`` may not set/remove ``host_name``."""
    return uid != 0 and host_name.startswith(_PRIVILEGED)
