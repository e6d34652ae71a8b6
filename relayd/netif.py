"""Interface resolution and multicast socket set-up (the I/O edge of both feeds and `listen`).

Linux only. Every socket returned here is non-blocking; callers wait for readiness with
``trio.lowlevel.wait_readable`` / ``wait_writable`` and then drain or send until ``EAGAIN``.

Receive side
------------
``open_group_receivers`` binds one or more UDP sockets per port to ``0.0.0.0:port`` and joins
each group on the ingress interface with ``IP_ADD_MEMBERSHIP``. ``IP_MULTICAST_ALL`` is turned
off, so a socket only gets the groups it joined itself, even when other sockets (or other
processes) joined other groups on the same port. A socket holds at most
``MAX_MEMBERSHIPS_PER_SOCKET`` memberships (the kernel's default ``igmp_max_memberships``), so
more groups on one port simply use more sockets. A group always lives on exactly one socket,
which keeps datagrams of one group in order.

Each socket has ``IP_PKTINFO`` (the destination group of every datagram) and ``SO_RXQ_OVFL``
(the socket's cumulative kernel drop counter) enabled. Both arrive as ancillary data; a buffer
of ``ANCBUFSIZE`` bytes holds them, and ``parse_ancillary`` turns them into
``(group as int, drops or None)``. The kernel only attaches the drop counter once the socket
has dropped something, so ``None`` means "no drop so far".
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address

import attrs
import trio

__all__ = [
    "ANCBUFSIZE",
    "IP_MULTICAST_ALL",
    "IP_PKTINFO",
    "MAX_MEMBERSHIPS_PER_SOCKET",
    "SO_RXQ_OVFL",
    "GroupReceiver",
    "InterfaceError",
    "accept_forever",
    "address_error",
    "bind_tcp_listener",
    "drain",
    "drain_error_queue",
    "join_groups",
    "leave_groups",
    "open_group_receivers",
    "open_multicast_sender",
    "parse_ancillary",
    "resolve_interface",
    "set_multicast_interface",
    "set_receive_buffer",
]

# Linux constants the socket module does not export (include/uapi/linux/in.h, asm/socket.h).
IP_PKTINFO = 8
IP_MULTICAST_ALL = 49
SO_RXQ_OVFL = 40
IP_RECVERR = 11
IP_ADD_SOURCE_MEMBERSHIP = 39
IP_DROP_SOURCE_MEMBERSHIP = 40
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SIOCGIFADDR = 0x8915
IFNAMSIZ = 16

#: The kernel's default ``net.ipv4.igmp_max_memberships``: groups joined on one socket.
MAX_MEMBERSHIPS_PER_SOCKET = 20

_IN_PKTINFO_SIZE = 12  # int ipi_ifindex; struct in_addr ipi_spec_dst; struct in_addr ipi_addr
#: Ancillary buffer size for ``recvmsg``/``recvmsg_into`` on a receiver socket: room for one
#: ``IP_PKTINFO`` (struct in_pktinfo) and one ``SO_RXQ_OVFL`` (u32) control message.
ANCBUFSIZE = socket.CMSG_SPACE(_IN_PKTINFO_SIZE) + socket.CMSG_SPACE(4)

#: Largest UDP payload over IPv4; a receive buffer of this size never truncates.
MAX_DATAGRAM = 65507

_SOL_IP = socket.IPPROTO_IP
#: struct ip_mreqn: multicast address, local address, interface index.
_IP_MREQN = struct.Struct("=4s4si")
_SOL_SOCKET = socket.SOL_SOCKET


class InterfaceError(Exception):
    """An interface name or address that cannot be used (unknown, no IPv4 address, ...)."""


def address_error(exc: OSError, host: str, port: int, action: str = "bind") -> OSError:
    """``exc`` with a message that names the address it is about: ``[Errno 98] cannot bind
    0.0.0.0:6667: Address already in use``. The errno (and so the OSError subclass) stays,
    so that handlers that test it keep working."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    reason = exc.strerror or str(exc)
    return OSError(exc.errno, f"cannot {action} {address}: {reason}")


def bind_tcp_listener(host: str, port: int, *, backlog: int = socket.SOMAXCONN) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port`` (``SO_REUSEADDR``), IPv4 unless
    ``host`` is an IPv6 address. On failure the socket is closed and the ``OSError`` names the
    address (see ``address_error``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(backlog)
        except OSError as exc:
            raise address_error(exc, host, port) from None
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def resolve_interface(name_or_addr: str) -> IPv4Address:
    """Return the IPv4 address of an interface given by name, or a literal IPv4 address.

    A literal address is returned as it is (``0.0.0.0`` lets the kernel choose by route). A
    name is asked from the kernel with ``SIOCGIFADDR`` (the interface's primary IPv4 address).
    """
    text = name_or_addr.strip()
    if not text:
        raise InterfaceError("empty interface name")
    try:
        addr = IPv4Address(text)
    except ValueError:
        pass
    else:
        if addr.is_multicast:
            raise InterfaceError(f"{text} is a multicast address, not an interface address")
        return addr
    raw = text.encode()
    if len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw:
        raise InterfaceError(f"{text!r} is neither an IPv4 address nor an interface name")
    request = struct.pack(f"{IFNAMSIZ}s{IFNAMSIZ}x", raw)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            reply = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise InterfaceError(f"no interface named {text!r}") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise InterfaceError(f"interface {text!r} has no IPv4 address") from None
            raise InterfaceError(f"cannot read the address of {text!r}: {exc.strerror}") from None
    # struct ifreq: name[16], then struct sockaddr_in (family u16, port u16, addr 4 bytes).
    return IPv4Address(reply[IFNAMSIZ + 4 : IFNAMSIZ + 8])


def interface_index(name_or_addr: str) -> int | None:
    """The index of an interface given by name, or by a literal address that is the primary
    address of an interface now (so it is followed like a name when that interface comes back
    with another address); None for ``0.0.0.0`` or an address no interface has as its primary
    one (nothing to follow). Raises InterfaceError for an unknown name."""
    text = name_or_addr.strip()
    try:
        address = IPv4Address(text)
    except ValueError:
        pass
    else:
        return None if address.is_unspecified else _index_of_address(address)
    try:
        return socket.if_nametoindex(text)
    except OSError:
        raise InterfaceError(f"no interface named {text!r}") from None


def _index_of_address(address: IPv4Address) -> int | None:
    """The index of the interface whose primary IPv4 address is ``address``, if any."""
    for index, name in socket.if_nameindex():
        try:
            if resolve_interface(name) == address:
                return int(index)
        except InterfaceError:
            continue
    return None


def _is_root() -> bool:
    return os.geteuid() == 0


def _set_buffer(
    sock: socket.socket, option: int, force_option: int, size: int, force: bool | None
) -> int:
    """Set SO_SNDBUF/SO_RCVBUF (the FORCE variant when allowed) and return the effective size.

    Linux doubles the value it stores (bookkeeping overhead) and reports the doubled value; the
    effective size returned here is the reported value halved, comparable with ``size``.
    """
    use_force = _is_root() if force is None else force
    done = False
    if use_force:
        try:
            sock.setsockopt(_SOL_SOCKET, force_option, size)
            done = True
        except PermissionError:
            done = False
    if not done:
        sock.setsockopt(_SOL_SOCKET, option, size)
    return int(sock.getsockopt(_SOL_SOCKET, option)) // 2


def set_multicast_interface(
    sock: socket.socket, interface: IPv4Address, ifindex: int | None
) -> None:
    """Send ``sock``'s multicast out of ``interface``: by its index when ``ifindex`` is given
    (an ``ip_mreqn``, which also names ``interface`` as the source address: without one the
    kernel picks a source of global scope, on loopback another interface's address), else by
    its address. Set it again after the interface's address changed."""
    if ifindex is not None:
        source = b"\0" * 4 if interface.is_unspecified else interface.packed
        mreqn = _IP_MREQN.pack(b"\0" * 4, source, ifindex)
        sock.setsockopt(_SOL_IP, socket.IP_MULTICAST_IF, mreqn)
    else:
        sock.setsockopt(_SOL_IP, socket.IP_MULTICAST_IF, interface.packed)


def open_multicast_sender(
    interface: IPv4Address,
    ttl: int,
    loop: bool,
    send_buffer: int,
    *,
    ifindex: int | None = None,
    force_buffer: bool | None = None,
    report_drops: bool = False,
) -> socket.socket:
    """A non-blocking UDP socket that sends multicast out of ``interface``.

    ``IP_MULTICAST_IF`` selects the egress interface (:func:`set_multicast_interface`).
    ``IP_MULTICAST_TTL`` and ``IP_MULTICAST_LOOP`` are set as given,
    ``SO_SNDBUF`` (``SO_SNDBUFFORCE`` as root) to ``send_buffer`` bytes.

    ``report_drops`` sets ``IP_RECVERR`` (the emit feeds do): without it ``udp_sendmsg``
    reports success for a datagram the egress queue discipline dropped (``ENOBUFS`` is turned
    into 0), so a shaped or congested interface loses datagrams without a trace. With it every
    such drop fails its ``send``, and asynchronous errors queue on the socket's error queue,
    which its owner must empty with :func:`drain_error_queue`.
    """
    if not 0 <= ttl <= 255:
        raise ValueError(f"multicast TTL {ttl} is outside 0..255")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        set_multicast_interface(sock, interface, ifindex)
        sock.setsockopt(_SOL_IP, socket.IP_MULTICAST_TTL, ttl)
        sock.setsockopt(_SOL_IP, socket.IP_MULTICAST_LOOP, 1 if loop else 0)
        if report_drops:
            sock.setsockopt(_SOL_IP, IP_RECVERR, 1)
        _set_buffer(sock, socket.SO_SNDBUF, SO_SNDBUFFORCE, send_buffer, force_buffer)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise InterfaceError(f"cannot send multicast from {interface}: {exc.strerror}") from None
    return sock


@attrs.define(eq=False)
class GroupReceiver:
    """One receiving socket: a port and the groups (at most 20) it joined."""

    sock: socket.socket
    port: int
    groups: tuple[IPv4Address, ...]
    interface: IPv4Address
    receive_buffer_requested: int
    #: what the kernel granted, comparable with the request (the reported value halved)
    receive_buffer_effective: int
    #: True when the kernel gave less than asked (raise net.core.rmem_max, or run as root)
    receive_buffer_capped: bool
    _names: dict[int, IPv4Address] = attrs.field(factory=dict, repr=False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def group_of(self, group: int) -> IPv4Address:
        """The IPv4Address of a group number from ``parse_ancillary`` (cached)."""
        name = self._names.get(group)
        if name is None:
            name = self._names[group] = IPv4Address(group)
        return name

    def close(self) -> None:
        self.sock.close()


def _plan_sockets(
    groups: Sequence[tuple[IPv4Address, int]], per_socket: int
) -> list[tuple[int, list[IPv4Address]]]:
    """Split groups into (port, groups) chunks of at most ``per_socket``, first-seen order."""
    by_port: dict[int, list[IPv4Address]] = {}
    for group, port in groups:
        members = by_port.setdefault(port, [])
        if group not in members:
            members.append(group)
    plan = []
    for port, members in by_port.items():
        for start in range(0, len(members), per_socket):
            plan.append((port, members[start : start + per_socket]))
    return plan


def _add_memberships(
    sock: socket.socket,
    port: int,
    groups: Sequence[IPv4Address],
    interface: IPv4Address,
    sources: Sequence[IPv4Address],
) -> None:
    for group in groups:
        try:
            if not sources:
                mreq = group.packed + interface.packed
                sock.setsockopt(_SOL_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            for source in sources:
                # struct ip_mreq_source: group, interface, source (source-specific join)
                mreq = group.packed + interface.packed + source.packed
                sock.setsockopt(_SOL_IP, IP_ADD_SOURCE_MEMBERSHIP, mreq)
        except OSError as exc:
            raise InterfaceError(
                f"cannot join {group}:{port} on {interface}: {exc.strerror}"
            ) from None


def _open_receiver(
    port: int,
    groups: list[IPv4Address],
    interface: IPv4Address,
    receive_buffer: int,
    force_buffer: bool | None,
    sources: Sequence[IPv4Address] = (),
) -> GroupReceiver:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(_SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(_SOL_IP, IP_MULTICAST_ALL, 0)
        sock.setsockopt(_SOL_IP, IP_PKTINFO, 1)
        sock.setsockopt(_SOL_SOCKET, SO_RXQ_OVFL, 1)
        effective = _set_buffer(
            sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, receive_buffer, force_buffer
        )
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as exc:
            raise InterfaceError(f"cannot bind UDP port {port}: {exc.strerror}") from None
        _add_memberships(sock, port, groups, interface, sources)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return GroupReceiver(
        sock=sock,
        port=port,
        groups=tuple(groups),
        interface=interface,
        receive_buffer_requested=receive_buffer,
        receive_buffer_effective=effective,
        receive_buffer_capped=effective < receive_buffer,
    )


def open_group_receivers(
    groups: Sequence[tuple[IPv4Address, int]],
    interface: IPv4Address,
    receive_buffer: int,
    *,
    max_memberships: int = MAX_MEMBERSHIPS_PER_SOCKET,
    force_buffer: bool | None = None,
    sources: Sequence[IPv4Address] = (),
) -> list[GroupReceiver]:
    """Join every ``(group, port)`` on ``interface``; one socket per port and 20 groups.

    ``force_buffer`` None uses ``SO_RCVBUFFORCE`` when running as root (falling back to
    ``SO_RCVBUF``); False always uses ``SO_RCVBUF``, which ``net.core.rmem_max`` caps. ``sources``
    non-empty makes the joins source-specific (``IP_ADD_SOURCE_MEMBERSHIP``, IGMPv3 SSM): only
    datagrams sent from one of these addresses arrive. On any failure every socket opened so
    far is closed and ``InterfaceError`` raised.
    """
    for group, port in groups:
        if not group.is_multicast:
            raise InterfaceError(f"{group} is not a multicast group")
        if not 1 <= port <= 65535:
            raise InterfaceError(f"port {port} is outside 1..65535")
    if max_memberships < 1:
        raise ValueError("max_memberships must be at least 1")
    receivers: list[GroupReceiver] = []
    try:
        for port, members in _plan_sockets(groups, max_memberships):
            receivers.append(
                _open_receiver(port, members, interface, receive_buffer, force_buffer, sources)
            )
    except BaseException:
        for receiver in receivers:
            receiver.close()
        raise
    return receivers


def join_groups(
    receiver: GroupReceiver,
    groups: Sequence[IPv4Address],
    sources: Sequence[IPv4Address] = (),
) -> GroupReceiver:
    """Join ``groups`` on ``receiver``'s socket too (the caller keeps to
    ``MAX_MEMBERSHIPS_PER_SOCKET``); returns the receiver with every group it holds (same
    socket). InterfaceError when a join fails."""
    _add_memberships(receiver.sock, receiver.port, groups, receiver.interface, sources)
    added = tuple(g for g in groups if g not in receiver.groups)
    return attrs.evolve(receiver, groups=receiver.groups + added)


def leave_groups(
    receiver: GroupReceiver,
    groups: Sequence[IPv4Address],
    sources: Sequence[IPv4Address] = (),
) -> GroupReceiver:
    """Leave ``groups`` on ``receiver``'s socket (the memberships ``_open_receiver`` made);
    returns the receiver with the groups it still holds (same socket). Datagrams already
    queued for a group left are still read."""
    sock = receiver.sock
    interface = receiver.interface
    for group in groups:
        try:
            if not sources:
                sock.setsockopt(_SOL_IP, socket.IP_DROP_MEMBERSHIP, group.packed + interface.packed)
            for source in sources:
                mreq = group.packed + interface.packed + source.packed
                sock.setsockopt(_SOL_IP, IP_DROP_SOURCE_MEMBERSHIP, mreq)
        except OSError as exc:
            raise InterfaceError(
                f"cannot leave {group}:{receiver.port} on {interface}: {exc.strerror}"
            ) from None
    kept = tuple(g for g in receiver.groups if g not in groups)
    return attrs.evolve(receiver, groups=kept)


def set_receive_buffer(
    receiver: GroupReceiver, size: int, *, force_buffer: bool | None = None
) -> GroupReceiver:
    """Give a running receiver's socket a new receive buffer size (``_set_buffer``)."""
    effective = _set_buffer(receiver.sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, size, force_buffer)
    return attrs.evolve(
        receiver,
        receive_buffer_requested=size,
        receive_buffer_effective=effective,
        receive_buffer_capped=effective < size,
    )


_PKTINFO_ADDR = struct.Struct("!I")  # ipi_addr at offset 8: the header's destination address
_DROPS = struct.Struct("=I")


def parse_ancillary(ancdata: list[tuple[int, int, bytes]]) -> tuple[int, int | None]:
    """``(destination group as int, kernel drop counter or None)`` from ``recvmsg`` ancdata.

    The drop counter is the socket's cumulative count of datagrams the kernel dropped (receive
    buffer full) when this datagram was queued; None when it has never dropped one. The group
    is 0 when no ``IP_PKTINFO`` arrived (a socket not set up by this module).
    """
    group = 0
    drops = None
    for level, kind, data in ancdata:
        if level == _SOL_IP and kind == IP_PKTINFO:
            group = _PKTINFO_ADDR.unpack_from(data, 8)[0]
        elif level == _SOL_SOCKET and kind == SO_RXQ_OVFL:
            drops = _DROPS.unpack_from(data)[0]
    return group, drops


#: Error queue entries read at most per :func:`drain_error_queue` call.
ERROR_QUEUE_BATCH = 1024
_EE_ERRNO = struct.Struct("=I")  # struct sock_extended_err starts with u32 ee_errno


def drain_error_queue(sock: socket.socket, limit: int = ERROR_QUEUE_BATCH) -> list[int]:
    """Empty the error queue of an ``IP_RECVERR`` socket (``MSG_ERRQUEUE``, non-blocking): the
    errno of each entry, oldest first. Each entry is a datagram sent earlier that failed
    after ``send`` returned; reading the last one also clears the socket's pending error,
    which would otherwise fail the next, unrelated ``send``."""
    errors: list[int] = []
    while len(errors) < limit:
        try:
            _data, ancdata, _flags, _addr = sock.recvmsg(
                1, socket.CMSG_SPACE(64), socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT
            )
        except (BlockingIOError, InterruptedError):
            break
        for level, kind, data in ancdata:
            if level == _SOL_IP and kind == IP_RECVERR and len(data) >= _EE_ERRNO.size:
                errors.append(_EE_ERRNO.unpack_from(data)[0])
    pending = sock.getsockopt(_SOL_SOCKET, socket.SO_ERROR)  # reading clears it
    if pending:
        errors.append(pending)
    return errors


def drain(
    receiver: GroupReceiver, max_datagrams: int = 1024
) -> list[tuple[IPv4Address, int, bytes, int | None]]:
    """Read up to ``max_datagrams`` waiting datagrams without blocking.

    Returns ``(group, port, payload, drops)`` per datagram, ``drops`` as in
    ``parse_ancillary``. An empty list means the socket had nothing (``EAGAIN``). Meant for
    tools; the capture hot path uses its own ``recvmsg_into`` loop.
    """
    out: list[tuple[IPv4Address, int, bytes, int | None]] = []
    recvmsg = receiver.sock.recvmsg
    port = receiver.port
    group_of = receiver.group_of
    for _ in range(max_datagrams):
        try:
            payload, ancdata, _flags, _addr = recvmsg(MAX_DATAGRAM, ANCBUFSIZE)
        except (BlockingIOError, InterruptedError):
            break
        group, drops = parse_ancillary(ancdata)
        out.append((group_of(group), port, payload, drops))
    return out


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Write all of ``data`` to a non-blocking stream socket, waiting only while it is full."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]


#: Accept errors that mean "no resources right now" (a descriptor or buffer limit): the
#: listener stays, the accept is retried after a pause.
ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Connections taken per pass before the loop yields to the other tasks.
ACCEPT_BATCH = 64


async def accept_forever(
    listener: socket.socket,
    admit: Callable[[socket.socket, str, int], None],
    no_resources: Callable[[OSError], None],
    *,
    retry: float = 0.1,
) -> None:
    """Accept on the non-blocking ``listener`` until cancelled, handing each connection to
    ``admit(sock, host, port)`` (which decides, at once, whether it is served or refused:
    the emit gate and the health server both refuse before any handshake work). Out of
    descriptors: ``no_resources(exc)``, then a pause of ``retry`` seconds."""
    while True:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                break
            except OSError as exc:
                if exc.errno not in ACCEPT_RESOURCE_ERRORS:
                    raise
                no_resources(exc)
                await trio.sleep(retry)
                break
            admit(sock, address[0], address[1])
        else:
            await trio.lowlevel.checkpoint()
