"""Alias expansion: one recipient address becomes one or more others before the message is queued.

Postfix's virtual_alias_maps (virtual(5)) and aliases(5) in one table, ``[aliases]`` in the
config. Keys, tried in this order for a recipient ``user+detail@domain``:

1. ``"user+detail@domain"`` (the address as given)
2. ``"user@domain"`` (the detail removed; it is added back to each target: ``t+detail@d``)
3. ``"user+detail"`` then ``"user"``: a bare local part matches in every local domain
4. ``"@domain"``: every address of the domain without an entry of its own (a catch-all)

Each target is looked up again (recursion) until no entry matches; an address met a second time
on its way is not expanded again but kept, so ``"a@x" = ["a@x", "archive@y"]`` delivers to a@x
and sends a copy to archive@y, and a loop ends instead of spinning. The final addresses are
deduplicated (case-insensitively), in order. More than ``max_expansion`` final addresses for one
recipient is an :class:`AliasError` (Postfix: virtual_alias_expansion_limit).

Relay permission is decided on the address the client gave, before expansion: an alias can
forward mail for a local domain anywhere, and never opens relaying for other domains.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from fastmta.spool.records import Recipient

if TYPE_CHECKING:
    from fastmta.config import Config

__all__ = ["AliasError", "Aliases", "xtext"]


class AliasError(ValueError):
    """An expansion over the limit; ``reply`` is the SMTP answer (a server-side problem)."""

    def __init__(self, address: str, limit: int) -> None:
        super().__init__(f"<{address}> expands to more than {limit} addresses")
        self.reply = (451, "4.3.5", f"Alias expansion error: <{address}> expands to more than "
                      f"{limit} addresses (limits.max_alias_expansion)")  # fmt: skip


def xtext(value: str) -> str:
    """RFC 3461 section 4 xtext: "+", "=", controls, space and non-ASCII as "+XX" (UTF-8)."""
    out = []
    for byte in value.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


class Aliases:
    """The alias table. ``table`` maps a key (see the module doc) to one target address or a
    list of them; ``is_local(domain)`` says which domains bare local-part keys apply to;
    ``delimiter`` separates user and detail ("" turns detail handling off)."""

    def __init__(
        self,
        table: Mapping[str, str | Sequence[str]],
        *,
        is_local: Callable[[str], bool] = lambda domain: False,
        delimiter: str = "+",
        max_expansion: int = 1000,
    ) -> None:
        self._table: dict[str, tuple[str, ...]] = {
            key.strip().lower(): (targets,) if isinstance(targets, str) else tuple(targets)
            for key, targets in table.items()
        }
        self._is_local = is_local
        self.delimiter = delimiter
        self.max_expansion = max_expansion

    @classmethod
    def from_config(cls, config: Config) -> Aliases:
        """The [aliases] table with local.recipient_delimiter and limits.max_alias_expansion."""
        from fastmta.policy import DomainSet

        return cls(
            config.aliases,
            is_local=DomainSet(config.policy.local_domains).__contains__,
            delimiter=config.local.recipient_delimiter,
            max_expansion=config.limits.max_alias_expansion,
        )

    def __bool__(self) -> bool:
        return bool(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def lookup(self, address: str) -> tuple[str, ...] | None:
        """The targets of the first entry matching ``address`` (one level), or None."""
        table = self._table
        key = address.lower()
        local, at, domain = key.rpartition("@")
        if not at:
            return table.get(key)
        found = table.get(key)
        if found is not None:
            return found
        detail = ""
        if self.delimiter and self.delimiter in local:
            user, _, _ = local.partition(self.delimiter)
            detail = address.rpartition("@")[0].partition(self.delimiter)[2]  # case kept
            found = table.get(f"{user}@{domain}")
            if found is not None:
                return self._with_detail(found, detail)
        else:
            user = local
        if self._is_local(domain):
            found = table.get(local)
            if found is not None:
                return found
            if detail:
                found = table.get(user)
                if found is not None:
                    return self._with_detail(found, detail)
        return table.get("@" + domain)

    def _with_detail(self, targets: tuple[str, ...], detail: str) -> tuple[str, ...]:
        """Postfix propagate_unmatched_extensions: user+detail -> target+detail."""
        out = []
        for t in targets:
            local, _, domain = t.rpartition("@")
            out.append(
                t if self.delimiter in local else f"{local}{self.delimiter}{detail}@{domain}"
            )
        return tuple(out)

    def expand(self, address: str) -> list[str]:
        """The final addresses for ``address`` (``[address]`` when no entry matches).

        Raises :class:`AliasError` over ``max_expansion`` addresses."""
        if self.lookup(address) is None:
            return [address]
        final: list[str] = []
        seen_final: set[str] = set()
        # depth-first, keeping the table's order; ``chain`` holds the addresses being expanded
        stack: list[tuple[str, frozenset[str]]] = [(address, frozenset())]
        while stack:
            addr, chain = stack.pop()
            key = addr.lower()
            targets = None if key in chain else self.lookup(addr)
            if targets is None:
                if key not in seen_final:
                    seen_final.add(key)
                    final.append(addr)
                    if len(final) > self.max_expansion:
                        raise AliasError(address, self.max_expansion)
                continue
            inner = chain | {key}
            stack.extend((t, inner) for t in reversed(targets))
            if len(stack) > 4 * self.max_expansion + 16:  # a fan-out bomb ends early too
                raise AliasError(address, self.max_expansion)
        return final

    def recipients(self, recipients: Iterable[Recipient]) -> list[Recipient]:
        """The envelope recipients to queue: every alias expanded, every address once.

        An expanded address carries its original as DSN ORCPT (RFC 3461 section 4.2) unless
        the client gave one, and the NOTIFY of the original. An address given or reached twice
        is kept once, the first time (case-insensitively; Postfix's cleanup duplicate filter).
        Raises AliasError."""
        if not self._table:  # the usual case: only duplicates to drop, if any
            given = list(recipients)
            if len(given) < 2 or len({r.address.lower() for r in given}) == len(given):
                return given
            recipients = given
        out: list[Recipient] = []
        seen: set[str] = set()
        for r in recipients:
            targets = self.expand(r.address) if self._table else None
            if targets is None or targets == [r.address]:
                if r.address.lower() not in seen:
                    seen.add(r.address.lower())
                    out.append(r)
                continue
            orcpt = r.orcpt or f"rfc822;{xtext(r.address)}"
            for t in targets:
                if t.lower() not in seen:
                    seen.add(t.lower())
                    out.append(Recipient(t, notify=r.notify, orcpt=orcpt))
        return out
