"""Verdicts and counter reasons: declared once, used everywhere.

Every frame that goes through the fast path ends with exactly one *verdict*, and the
fast path counts it in ``counters[direction, verdict]``.  The list below is the single
declaration: ``setup.py`` expands it into a Cython ``cdef enum`` (``_verdicts.pxi``,
generated, not committed), the pure-Python twin reads it directly, the metrics
endpoint names its series after it and the tests compare counters by these names.

    frame ──► parse ──► lookup ──► rewrite ──► TRANSLATED / HAIRPIN
                │          │
                │          └─► MISS_OUT / MISS_IN / MISS_ICMP_ERROR / MISS_HAIRPIN
                │                 (the slow path takes it from here)
                ├─► NOT_NAT, TTL_EXCEEDED, FRAGMENT, DROP_* (malformed, by reason)
                └─► later fragment ──► fragment table ──► TRANSLATED / HAIRPIN / FRAGMENT_HELD
                                                          / DROP_FRAG_* (hypernat/_frag.pyx)
      size > egress MTU ─► FRAG_NEEDED (DF) / FRAGMENTED, OUTPUT_FULL (after the rewrite)
      super-frame segment > egress MTU ─► FRAG_NEEDED (DF) / DROP_GSO_TOO_BIG (UDP) / resegmented (TCP)

Order matters only in that it fixes the numbers; append, never reorder, so that
snapshots and saved counters keep their meaning.
"""

# (name, help text).  Index in this tuple == the verdict's number.
VERDICTS = (
    ("translated", "translated and sent to the other side"),
    ("hairpin", "inside to a mapped external endpoint: translated both ways, sent back inside"),
    ("miss_out", "outgoing frame without a session (first packet of a connection)"),
    ("miss_in", "incoming frame without a session here"),
    ("miss_icmp_error", "ICMP error whose embedded flow has no session here"),
    ("miss_hairpin", "inside to an external-pool address, one half of the hairpin missing"),
    ("not_nat", "not for NAT: ARP, IPv6, QinQ, other IP protocols"),
    ("ttl_exceeded", "IPv4 TTL <= 1: not forwarded; ICMP time exceeded answered (router_events say whether)"),
    ("fragment", "IPv4 fragment on a translator without a fragment table: dropped"),
    ("drop_truncated", "frame shorter than its Ethernet + IPv4 header, or outside the buffer"),
    ("drop_bad_version", "ethertype IPv4 but version != 4"),
    ("drop_bad_ihl", "IPv4 IHL < 5 or header longer than the frame"),
    ("drop_bad_total_length", "IPv4 total length shorter than its header or longer than the frame"),
    ("drop_bad_l4_header", "TCP/UDP/ICMP header truncated or inconsistent (TCP data offset, UDP length)"),
    ("drop_bad_icmp_checksum", "ICMP error with a wrong checksum (RFC 5508 REQ-3)"),
    ("drop_icmp_error_malformed", "ICMP error whose embedded packet is truncated or unusable"),
    ("drop_icmp_unsupported", "ICMP type neither echo nor a translatable error"),
    # -- fragments (virtual reassembly, hypernat/_frag.pyx; docs/fastpath.md "Fragments") --
    ("fragment_held", "later fragment waiting for its first fragment's translation (sent when it comes)"),
    ("drop_frag_tiny", "first fragment too short for its transport header, or TCP offset 8 (RFC 1858)"),
    ("drop_frag_offset", "fragment reaching past 65535 bytes"),
    ("drop_frag_malformed", "fragment without data, a non-last one not a multiple of 8, or data past the end"),
    ("drop_frag_overlap", "fragment overlapping (or repeating) one already seen of its datagram"),
    ("drop_frag_table_full", "no room for another fragmented datagram (limits.fragments.entries)"),
    ("drop_frag_hold_full", "no room to hold an early fragment (limits.fragments.bytes, or too many pieces)"),
    ("drop_icmp_error_fragment", "ICMP error that is itself fragmented or quotes a later fragment (RFC 1122)"),
    ("drop_icmp_error_about_error", "ICMP error quoting an ICMP error or another non-query ICMP message"),
)

# -- the gateway as a router (issue 13 items 2 and 4: generated frames, MSS clamping) --
# Frames the fast path answers or splits itself; what it generated lands in the
# Translator's output area (docs/fastpath.md, "Generated frames").
VERDICTS += (
    ("frag_needed", "DF set and longer than the egress MTU: not forwarded; ICMP fragmentation needed answered"),
    ("fragmented", "longer than the egress MTU, DF clear: translated and sent as fragments from the output area"),
    ("output_full", "translated, but its fragments did not fit the batch's output area: dropped"),
)
# -- GSO super-frames (issue 12/13: sized by their segments, docs/fastpath.md) --
VERDICTS += (
    ("drop_gso_too_big", "UDP super-frame, DF clear, whose segments are longer than the egress MTU "
                         "(never sent with oversized segments; fragments of segments are not made)"),
)
# Router events, counted per direction beside the verdicts (Translator.router_events):
# a frame has one verdict, and may cause one of these besides.
ROUTER_EVENTS = (
    ("icmp_time_exceeded", "ICMP time exceeded (type 11 code 0) sent"),
    ("icmp_frag_needed", "ICMP fragmentation needed (type 3 code 4, RFC 1191 next-hop MTU) sent"),
    ("icmp_rate_limited", "ICMP error not sent: the NIC's token bucket was empty (RFC 1812 4.3.2.8)"),
    ("icmp_suppressed", "ICMP error not sent: about an ICMP error, a non-first fragment, a broadcast or "
                        "multicast, an invalid source (RFC 1812 4.3.2.7), or no source address for that side"),
    ("output_full", "a generated frame did not fit the batch's output area"),
    ("fragments", "fragments written to the output area"),
    ("mss_clamped", "TCP SYN whose MSS option was lowered to tcp_mss_clamp"),
    ("mss_bad_options", "TCP SYN with malformed options: MSS not clamped, frame left as it was"),
    ("gso_resegmented", "TCP super-frame, DF clear, too long per segment: its gso_size lowered to fit the MTU"),
)
ROUTER_EVENT_NAMES = tuple(name for name, _ in ROUTER_EVENTS)
ROUTER_EVENT = {name: i for i, name in enumerate(ROUTER_EVENT_NAMES)}
N_ROUTER_EVENTS = len(ROUTER_EVENTS)

VERDICT_NAMES = tuple(name for name, _ in VERDICTS)
VERDICT = {name: i for i, name in enumerate(VERDICT_NAMES)}
N_VERDICTS = len(VERDICTS)

# Verdicts after which the frame is to be sent (by the I/O layer).
SEND_VERDICTS = frozenset((VERDICT["translated"], VERDICT["hairpin"]))
# Verdicts whose frame was rewritten in place although the frame itself is not sent.
REWRITTEN_VERDICTS = frozenset((VERDICT["fragmented"], VERDICT["output_full"]))
# Verdicts that hand the frame to the slow path.
MISS_VERDICTS = frozenset(
    VERDICT[n] for n in ("miss_out", "miss_in", "miss_icmp_error", "miss_hairpin")
)
# Verdicts that are drops of malformed input.
DROP_VERDICTS = frozenset(i for i, n in enumerate(VERDICT_NAMES) if n.startswith("drop_"))

# Directions: index of the first axis of the counters array.
OUT = 0  # from inside (VPC) toward the Internet: rewrite source
IN = 1  # from the Internet toward the external pool: rewrite destination
DIRECTION_NAMES = ("out", "in")

# Slow-path reasons (counted in Python by the parts above the fast path).  Listed here
# so that metrics and tests name them the same way; the parts append what they count.
SLOW_PATH_REASONS = (
    ("table_full", "flow table full: insert refused"),
    ("ports_exhausted", "no free external port for a new mapping"),
    ("host_port_cap", "the internal host reached its port cap"),
    ("filtered", "incoming packet refused by the filtering behaviour"),
    ("unsolicited_syn", "unsolicited inbound SYN dropped (RFC 5382 REQ-4)"),
    ("not_in_pool", "incoming packet to an address outside the external pool"),
    ("not_internal", "outgoing packet from an address outside the internal prefixes"),
    ("fetch_timeout", "rule fetch from the owner timed out"),
    ("fetch_nack", "owner has no such rule"),
    ("fetch_negative_cached", "recent NACK for this endpoint: dropped without fetching"),
    ("fetch_rate_limited", "too many fetches from this remote source"),
    ("pending_queue_full", "queue of packets waiting for a fetched rule is full"),
    ("lease_expired", "clone dropped: its lease ran out"),
    ("bad_message", "malformed or forged control message dropped"),
    ("no_mapping", "incoming packet to an external endpoint that has no mapping"),
    ("icmp_error_no_session", "ICMP error about a flow with no session at its owner"),
    ("not_owner", "fetch for an endpoint (or host) this NIC does not own"),
    ("hairpin_disabled", "inside to a mapped external endpoint while hairpinning is off"),
    ("recovering", "a new mapping asked for a host whose rules are being recovered after a crash"),
    ("journal_unavailable", "no new port block: the block journal cannot be written (disk full, I/O error)"),
    ("host_rate_limited", "the internal host opened new connections faster than limits.host_connection_rate"),
)
SLOW_PATH_REASON_NAMES = tuple(name for name, _ in SLOW_PATH_REASONS)

# -- fragments: the fragment table's own counters (events that are not one frame's
# verdict: frames released or dropped later, datagrams seen), hypernat/_frag.pyx --
FRAG_COUNTERS = (
    ("frag_datagrams", "fragmented datagrams tracked (entries created)"),
    ("frag_completed", "datagrams whose every fragment went through (entry freed early)"),
    ("frag_held", "early fragments held until their first fragment was translated"),
    ("frag_released", "held fragments translated and sent after their first fragment"),
    ("frag_expired_entries", "datagrams whose entry timed out (limits.fragments.timeout)"),
    ("frag_expired_dropped", "held fragments dropped because their first fragment never came in time"),
    ("frag_recut", "held fragments longer than their exit link's MTU, released cut into smaller fragments"),
    ("frag_output_full", "held fragments dropped at release: no room in the translate call's output area"),
)
FRAG_COUNTER_NAMES = tuple(name for name, _ in FRAG_COUNTERS)


def pxi_source() -> str:
    """The Cython include that ``setup.py`` writes as ``hypernat/_verdicts.pxi``."""
    lines = ["# Generated by setup.py from hypernat/verdicts.py: do not edit.", "cdef enum:"]
    lines += [f"    V_{name.upper()} = {i}" for i, name in enumerate(VERDICT_NAMES)]
    lines.append(f"    N_VERDICTS = {N_VERDICTS}")
    lines += [f"    EV_{name.upper()} = {i}" for i, name in enumerate(ROUTER_EVENT_NAMES)]
    lines.append(f"    N_ROUTER_EVENTS = {N_ROUTER_EVENTS}")
    lines.append(f"    DIR_OUT = {OUT}")
    lines.append(f"    DIR_IN = {IN}")
    lines += [f"    FC_{name.upper()} = {i}" for i, name in enumerate(FRAG_COUNTER_NAMES)]
    lines.append(f"    N_FRAG_COUNTERS = {len(FRAG_COUNTER_NAMES)}")
    return "\n".join(lines) + "\n"
