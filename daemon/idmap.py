"""``--translate-uid`` / ``--translate-gid``: guest <-> host id translation.

The Rust virtiofsd 1.13 syntax, one rule per option (the option may be
repeated)::

    map:GUEST:HOST:COUNT           [GUEST, GUEST+COUNT) <-> [HOST, HOST+COUNT), both ways
    guest:GUEST:HOST:COUNT         guest -> host only, 1:1 over the range
    host:HOST:GUEST:COUNT          host -> guest only, 1:1 over the range
    squash-guest:GUEST:HOST:COUNT  every guest id of the range -> the one host id
    squash-host:HOST:GUEST:COUNT   every host id of the range -> the one guest id
    forbid-guest:GUEST:COUNT       a request from a guest id of the range: EPERM

The type is a word of letters, digits, ``-`` and ``_`` (case-insensitive);
the first character after it is the separator and must separate every
field (``map:0:1000:1`` and ``map/0/1000/1`` are the same rule).  Fields are
unsigned 32-bit numbers.  A range must end by 2**32 - 1, and within one
direction (guest -> host, host -> guest) no two rules may overlap: both are
start-up errors.  Ids no rule covers translate to themselves, so an empty
map is the identity.  The two directions are independent (nothing needs
to be invertible): ``squash-guest:0:1000:4294967295`` alone makes every
guest id create as host 1000 while attributes pass back unchanged.

Where ids cross (see DESIGN.md, "Rootless mode"): the caller's uid/gid of
every request (guest -> host, before the filesystem uses them as
credentials), SETATTR's new owner (guest -> host) and every attribute in a
reply (host -> guest).  Host ids here are the ids the daemon sees: inside
a user namespace (``--uid-map``) those are the namespace's.

``--uid-map`` / ``--gid-map`` (:class:`NamespaceMap`, ``:NS:HOST:COUNT:``)
are the user-namespace mappings of an unprivileged ``--sandbox
namespace``, written by ``newuidmap``/``newgidmap`` (see
:mod:`.sandbox`).
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "IDENTITY",
    "KINDS",
    "IdMap",
    "IdMapError",
    "IdRule",
    "IdTranslation",
    "NamespaceMap",
    "parse_namespace_map",
    "parse_rule",
]

_U32_END = 1 << 32  # ranges are [start, start + count), within u32
_MAX_END = _U32_END - 1  # Rust's checked u32 add: start + count <= u32::MAX

#: rule type -> number of numeric fields.
KINDS: dict[str, int] = {
    "map": 3,
    "guest": 3,
    "host": 3,
    "squash-guest": 3,
    "squash-host": 3,
    "forbid-guest": 2,
}


class IdMapError(ValueError):
    """A ``--translate-uid``/``--translate-gid``/``--uid-map``/``--gid-map``
    value that does not parse or contradicts another rule."""


@dataclass(frozen=True)
class IdRule:
    """One parsed rule; ``target`` is None for ``forbid-guest``."""

    kind: str
    first: int
    target: int | None
    count: int

    def __str__(self) -> str:
        if self.target is None:
            return f"{self.kind}:{self.first}:{self.count}"
        return f"{self.kind}:{self.first}:{self.target}:{self.count}"


def _u32(text: str, spec: str) -> int:
    digits = text[1:] if text.startswith("+") else text  # Rust's u32 parse takes "+"
    if not digits.isascii() or not digits.isdigit():
        raise IdMapError(f"invalid value {text!r} in id map {spec!r}: not a number")
    value = int(digits, 10)
    if value >= _U32_END:
        raise IdMapError(f"invalid value {text!r} in id map {spec!r}: more than 32 bits")
    return value


def parse_rule(spec: str) -> IdRule:
    """One ``--translate-uid``/``--translate-gid`` value (module docstring)."""
    i = 0
    while i < len(spec) and (spec[i].isalnum() or spec[i] in "-_"):
        i += 1
    if i == len(spec):
        raise IdMapError(f"id map {spec!r}: expected TYPE:NUMBERS (e.g. map:0:1000:1)")
    kind, sep = spec[:i].lower(), spec[i]
    values = [_u32(v, spec) for v in spec[i + 1 :].split(sep)]
    if kind not in KINDS:
        raise IdMapError(f"id map {spec!r}: unknown type {kind!r} (one of {', '.join(KINDS)})")
    want = KINDS[kind]
    if len(values) != want:
        raise IdMapError(f"id map {spec!r}: {kind} takes {want} numbers, got {len(values)}")
    if want == 2:
        rule = IdRule(kind, values[0], None, values[1])
    else:
        rule = IdRule(kind, values[0], values[1], values[2])
    starts = [rule.first]
    if rule.target is not None and not rule.kind.startswith("squash"):
        starts.append(rule.target)  # a 1:1 range's targets must fit too
    if any(start + rule.count > _MAX_END for start in starts):
        raise IdMapError(f"id map {spec!r}: range overflow (ids end at {_MAX_END})")
    return rule


@dataclass(frozen=True)
class _Entry:
    """One direction's piece: ``[start, end)`` -> ``base + (id - start)``
    (``squash``: -> ``base``; ``base`` None: forbidden)."""

    start: int
    end: int
    base: int | None
    squash: bool
    rule: IdRule

    def apply(self, ident: int) -> int | None:
        if self.base is None:
            return None
        return self.base if self.squash else self.base + (ident - self.start)


class _Direction:
    """Sorted, non-overlapping entries of one direction; lookups by bisection."""

    __slots__ = ("_entries", "_starts", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._entries: list[_Entry] = []
        self._starts: list[int] = []

    def add(self, entry: _Entry) -> None:
        if entry.start == entry.end:
            return  # an empty range maps nothing
        for other in self._entries:
            if entry.start < other.end and other.start < entry.end:
                raise IdMapError(
                    f"{self.name} mapping {str(entry.rule)!r} overlaps {str(other.rule)!r}"
                )
        i = bisect.bisect(self._starts, entry.start)
        self._entries.insert(i, entry)
        self._starts.insert(i, entry.start)

    def find(self, ident: int) -> _Entry | None:
        i = bisect.bisect(self._starts, ident) - 1
        if i >= 0 and ident < self._entries[i].end:
            return self._entries[i]
        return None

    def __bool__(self) -> bool:
        return bool(self._entries)


@dataclass(frozen=True)
class IdMap:
    """The translation of one kind of id (uids or gids), both directions."""

    rules: tuple[IdRule, ...] = ()
    _to_host: _Direction = field(init=False, repr=False, compare=False)
    _to_guest: _Direction = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        to_host, to_guest = _Direction("guest-to-host"), _Direction("host-to-guest")
        for r in self.rules:
            end = r.first + r.count
            if r.kind in ("map", "guest"):
                to_host.add(_Entry(r.first, end, r.target, False, r))
            if r.kind == "map":
                assert r.target is not None
                to_guest.add(_Entry(r.target, r.target + r.count, r.first, False, r))
            if r.kind == "host":
                to_guest.add(_Entry(r.first, end, r.target, False, r))
            if r.kind == "squash-guest":
                to_host.add(_Entry(r.first, end, r.target, True, r))
            if r.kind == "squash-host":
                to_guest.add(_Entry(r.first, end, r.target, True, r))
            if r.kind == "forbid-guest":
                to_host.add(_Entry(r.first, end, None, False, r))
        object.__setattr__(self, "_to_host", to_host)
        object.__setattr__(self, "_to_guest", to_guest)

    @classmethod
    def parse(cls, specs: Iterable[str]) -> IdMap:
        """From the option's values, in order (a bad one raises :class:`IdMapError`)."""
        return cls(tuple(parse_rule(s) for s in specs))

    @property
    def identity(self) -> bool:
        """Whether every id translates to itself both ways (no rule maps anything)."""
        return not self._to_host and not self._to_guest

    def to_host(self, guest_id: int) -> int:
        """A guest id as the host sees it; ``PermissionError`` (EPERM) when forbidden."""
        entry = self._to_host.find(guest_id)
        if entry is None:
            return guest_id
        host = entry.apply(guest_id)
        if host is None:
            raise PermissionError(errno.EPERM, f"guest id {guest_id} is forbidden ({entry.rule})")
        return host

    def to_guest(self, host_id: int) -> int:
        """A host id as the guest sees it."""
        entry = self._to_guest.find(host_id)
        if entry is None:
            return host_id
        guest = entry.apply(host_id)
        assert guest is not None  # no host-side rule forbids
        return guest

    def __str__(self) -> str:
        return ",".join(map(str, self.rules)) or "identity"


@dataclass(frozen=True)
class IdTranslation:
    """Both maps the session applies: ``uid`` (``--translate-uid``) and ``gid``."""

    uid: IdMap = IdMap()
    gid: IdMap = IdMap()

    @classmethod
    def parse(cls, uid_specs: Iterable[str], gid_specs: Iterable[str]) -> IdTranslation:
        return cls(IdMap.parse(uid_specs), IdMap.parse(gid_specs))

    @property
    def identity(self) -> bool:
        return self.uid.identity and self.gid.identity


#: No translation (the default).
IDENTITY = IdTranslation()


@dataclass(frozen=True)
class NamespaceMap:
    """One ``--uid-map``/``--gid-map`` range: namespace ids ``[inside,
    inside+count)`` are host ids ``[outside, outside+count)``."""

    inside: int
    outside: int
    count: int

    def __str__(self) -> str:
        return f":{self.inside}:{self.outside}:{self.count}:"


def parse_namespace_map(spec: str) -> NamespaceMap:
    """``:namespace_id:host_id:count:`` (virtiofsd's form: five ``:`` fields,
    the first and last empty)."""
    fields = spec.split(":")
    if len(fields) != 5 or fields[0] or fields[4]:
        raise IdMapError(f"id range {spec!r}: expected :namespace_id:host_id:count:")
    inside, outside, count = (_u32(f, spec) for f in fields[1:4])
    if count == 0:
        raise IdMapError(f"id range {spec!r}: count must be at least 1")
    if inside + count > _MAX_END or outside + count > _MAX_END:
        raise IdMapError(f"id range {spec!r}: range overflow (ids end at {_MAX_END})")
    return NamespaceMap(inside, outside, count)


def namespace_map_args(ranges: Sequence[NamespaceMap]) -> list[str]:
    """``newuidmap``/``newgidmap`` arguments after the pid."""
    return [str(n) for r in ranges for n in (r.inside, r.outside, r.count)]
