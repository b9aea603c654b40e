"""The SCP's association policy: which A-ASSOCIATE-RQs are rejected, and how.

:meth:`AssociationPolicy.on_requested` is bound to ``EVT_REQUESTED``, which pynetdicom triggers (on
both receive paths) after the A-ASSOCIATE-RQ is in and before it negotiates; a handler may reject there
(pynetdicom then skips its negotiation). The checks, in this order, and their A-ASSOCIATE-RJ:

- calling AE title not in ``node.allowed_ae_titles``: permanent, service user, calling-AE-title-not-recognised;
- source IP not in ``node.allowed_ips``: permanent, service user, no-reason-given (an IPv4 peer of a
  dual-stack ``node.host`` such as ``::``, seen as ``::ffff:a.b.c.d``, is matched as that IPv4 address);
- the SCP stopping, or free disk below ``storage.min_free_disk_mb``: transient, service provider,
  local-limit-exceeded (also when a check itself fails).

Every rejection is logged with its reason, calling AE title and source address. Not
``AE.require_calling_aet``: pynetdicom checks it only after this handler, lets its association limit
override that rejection's reason, and logs no source address.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Callable, Iterable

from pynetdicom import evt

from qcnode.log import get_logger

log = get_logger("qcnode.scp")

Rejection = tuple[int, int, int]  # A-ASSOCIATE-RJ (result, source, reason)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_IP = (0x01, 0x01, 0x01)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)


class AssociationPolicy:
    """``policy(calling_ae, address)``: None to accept, else the A-ASSOCIATE-RJ to send. ``closing``,
    ``free_disk_mb`` and ``min_free_disk_mb`` are asked anew for each association."""

    def __init__(self, allowed_ae_titles: Iterable[str], allowed_ips: Iterable[str], closing: Callable[[], bool],
                 free_disk_mb: Callable[[], float], min_free_disk_mb: Callable[[], float]):
        self.allowed_aets = {a.strip() for a in allowed_ae_titles if a.strip()}
        self.allowed_nets = [ipaddress.ip_network(n, strict=False) for n in allowed_ips]
        self.closing = closing
        self.free_disk_mb = free_disk_mb
        self.min_free_disk_mb = min_free_disk_mb

    def __call__(self, calling_ae: str, address: str) -> Rejection | None:
        if self.allowed_aets and calling_ae not in self.allowed_aets:
            log.warning("association_rejected", reason="calling AE title not allowed", calling_ae=calling_ae,
                        source_ip=address)
            return REJECT_CALLING_AE
        if self.allowed_nets and not self.ip_allowed(address):
            log.warning("association_rejected", reason="source IP not allowed", calling_ae=calling_ae,
                        source_ip=address)
            return REJECT_IP
        if self.closing():
            return REJECT_LOCAL_LIMIT
        free, watermark = self.free_disk_mb(), self.min_free_disk_mb()
        if free < watermark:
            log.error("association_rejected", reason="free disk below watermark", free_mb=round(free, 1),
                      min_free_disk_mb=watermark, calling_ae=calling_ae, source_ip=address)
            return REJECT_LOCAL_LIMIT
        return None

    def ip_allowed(self, address: str) -> bool:
        """``address`` is in ``node.allowed_ips`` (an IPv4-mapped IPv6 address as its IPv4 address)."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        return any(ip in net or (mapped is not None and mapped in net) for net in self.allowed_nets)

    def on_requested(self, event: Any) -> None:
        """``EVT_REQUESTED`` handler: reject the association if the policy says so."""
        assoc = event.assoc
        try:
            address = assoc.requestor.address
        except ValueError:
            address = ""
        try:
            rejection = self(str(assoc.requestor.primitive.calling_ae_title).strip(), address)
        except Exception:  # noqa: BLE001 - a failing check (e.g. the spool's disk gone) must not accept
            log.exception("association_policy_error", source_ip=address)
            rejection = REJECT_LOCAL_LIMIT
        if rejection:
            reject_association(assoc, rejection)


def reject_association(assoc: Any, rejection: Rejection) -> None:
    """Send the A-ASSOCIATE-RJ and end the association, as pynetdicom does for its own rejections."""
    assoc.acse.send_reject(*rejection)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()
