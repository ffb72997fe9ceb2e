//! Policy rules for a new flow: one lookup per field, each giving the set
//! of rules that field matches ([`RuleSet`]); the first rule in all of
//! them decides. The daemon compiles the rules into two banks and
//! switches `Settings::rules` once the idle bank is written, so a reload
//! is seen whole or not at all. Established flows never come here.
use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use multihome_common::{
    BALANCE_ENDPOINT, BALANCE_SITE, BALANCE_SOURCE, FlowKey, IPPROTO_TCP, IPPROTO_UDP, MAX_RULES,
    MAX_UPLINKS, RULE_MAIN, RULE_UNREACHABLE, RULE_WORDS, RuleAction, RuleAddrKey, RuleSet,
    rules_count,
};

use crate::{
    affinity,
    maps::{RULE_ACTION, RULE_DPORT, RULE_DSCP, RULE_DST, RULE_PROTO, RULE_SRC, SELECT},
    parse::{Packet, ptr_at},
};

/// What the policy rules and affinities say of a new flow.
pub struct Decision {
    /// The first matching rule's [`RuleAction`]; 0 (`balanced`) if none.
    pub action: RuleAction,
    /// The uplink a live affinity or endpoint record of its policy holds
    /// it to, if any.
    pub stuck: Option<u8>,
    /// Its policy maps each internal endpoint to one uplink and port.
    pub endpoint: bool,
    /// The public port its endpoint's record holds (with `stuck`).
    pub endpoint_port_be: Option<u16>,
}

/// The policy of the new flow `key` (from `pkt`) under `rules`
/// (`Settings::rules`), and its affinity. The work is done by BPF global
/// functions ([`mh_classify`], [`mh_stick`]): the verifier checks each
/// once, instead of once per path into it, and their branches do not
/// multiply the paths after.
#[inline(always)]
pub fn decide(ctx: &TcContext, pkt: &Packet, key: &FlowKey, rules: u32) -> Decision {
    // DSCP: the top six bits of the TOS byte (RFC 2474).
    let dscp = match ptr_at::<u8>(ctx, pkt.l3 + 1) {
        // SAFETY: bounds checked by `ptr_at`.
        Some(tos) => (unsafe { *tos }) >> 2,
        None => 0,
    };
    // Ports count for TCP and UDP; every other protocol is port 0.
    let dport = if pkt.proto == IPPROTO_TCP || pkt.proto == IPPROTO_UDP {
        u16::from_be(pkt.dport_be)
    } else {
        0
    };
    // No rules: `balanced`, without the call.
    let action = if rules_count(rules) == 0 {
        0
    } else {
        mh_classify(
            key.saddr_be,
            key.daddr_be,
            dport as u32 | (key.proto as u32) << 16 | (dscp as u32) << 24,
            rules & 0xffff,
        )
    };
    let word = mh_stick(
        key.saddr_be,
        key.daddr_be,
        u32::from(key.sport_be) << 16 | key.proto as u32,
        action,
    );
    let stuck = (word >> 16) as u32 & 0xff;
    Decision {
        action: word as u32 & (RULE_UNREACHABLE | RULE_MAIN | 0xff),
        stuck: (stuck < MAX_UPLINKS).then_some(stuck as u8),
        endpoint: word & DECIDE_ENDPOINT != 0,
        endpoint_port_be: (word & DECIDE_ENDPOINT_PORT != 0).then_some((word >> 32) as u16),
    }
}

/// [`mh_classify`]'s `rules` bit: match only the rules that name no
/// address (their source and destination are "any"), for IPv6 flows,
/// which the IPv4 prefixes of rules cannot describe.
const ANY_ADDRESS: u32 = 1 << 31;

/// The first rule an IPv6 flow matches among those that name no address,
/// by protocol, destination port and DSCP; 0 (`balanced`) when none.
#[inline(always)]
pub fn decide6(proto: u8, dport: u16, dscp: u8, rules: u32) -> RuleAction {
    if rules_count(rules) == 0 {
        return 0;
    }
    let dport = if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        dport
    } else {
        0
    };
    mh_classify(
        0,
        0,
        dport as u32 | (proto as u32) << 16 | (dscp as u32) << 24,
        rules & 0xffff | ANY_ADDRESS,
    )
}

/// [`mh_stick`]: the flow's policy is `balance = "endpoint"`.
const DECIDE_ENDPOINT: u64 = 1 << 24;
/// [`mh_stick`]: its endpoint has a record; the port is in bits 32-47.
const DECIDE_ENDPOINT_PORT: u64 = 1 << 48;

/// [`decide`]'s rule matching as a BPF global function: the verifier
/// checks it once on its own, whatever the paths into it. `fields`: the
/// destination port (host order), protocol (bits 16-23) and DSCP (bits
/// 24-29); `rules`: the low 16 bits of `Settings::rules`, and
/// [`ANY_ADDRESS`]. Returns the [`RuleAction`].
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn mh_classify(saddr_be: u32, daddr_be: u32, fields: u32, rules: u32) -> u32 {
    let key = FlowKey {
        saddr_be,
        daddr_be,
        sport_be: 0,
        dport_be: 0,
        proto: (fields >> 16) as u8,
        _pad0: 0,
        _pad1: 0,
    };
    classify(&key, rules, fields & 0xffff, fields >> 24)
}

/// [`decide`]'s affinity and endpoint lookups for a flow under `action`,
/// as a second global function (two small frames instead of one large
/// one, which the LAN program's stack could not hold). `ports`: the LAN
/// port (as on the wire) above the protocol. Returns the action (bits
/// 0-9), the stuck uplink (bits 16-23, 0xff: none) and the `DECIDE_*`
/// bits.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn mh_stick(saddr_be: u32, daddr_be: u32, ports: u32, action: u32) -> u64 {
    let key = FlowKey {
        saddr_be,
        daddr_be,
        sport_be: (ports >> 16) as u16,
        dport_be: 0,
        proto: ports as u8,
        _pad0: 0,
        _pad1: 0,
    };
    let policy = action & 0xff;
    let mut out = u64::from(action) | 0xff << 16;
    if action & (RULE_UNREACHABLE | RULE_MAIN) != 0 {
        return out;
    }
    let Some(t) = SELECT.get(policy) else {
        return out;
    };
    if sticky(t.balance)
        && let Some(id) = affinity::stuck(&affinity::key(&key, t, policy), t)
    {
        out = u64::from(action) | u64::from(id) << 16;
    } else if t.balance == BALANCE_ENDPOINT {
        out |= DECIDE_ENDPOINT;
        if let Some((id, port_be)) = affinity::endpoint(&key, t, policy) {
            out = u64::from(action)
                | u64::from(id) << 16
                | DECIDE_ENDPOINT
                | DECIDE_ENDPOINT_PORT
                | u64::from(port_be) << 32;
        }
    }
    out
}

#[inline(always)]
fn sticky(balance: u8) -> bool {
    balance == BALANCE_SOURCE || balance == BALANCE_SITE
}

/// The action of the first rule the flow `key` matches; 0, the `balanced`
/// policy, when none does.
#[inline(always)]
fn classify(key: &FlowKey, rules: u32, dport: u32, dscp: u32) -> RuleAction {
    if (rules & 0xffff) >> 1 == 0 {
        return 0;
    }
    let bank = rules & 1;
    // The bank's 32 bits, and the address's unless any address will do:
    // then only the "any" (0/0) entry matches.
    let prefix_len = if rules & ANY_ADDRESS != 0 { 32 } else { 64 };
    let addr_key = |addr_be| Key {
        prefix_len,
        data: RuleAddrKey {
            bank_be: bank.to_be(),
            addr_be,
        },
    };
    let Some(src) = RULE_SRC.get(&addr_key(key.saddr_be)) else {
        return 0;
    };
    let Some(dst) = RULE_DST.get(&addr_key(key.daddr_be)) else {
        return 0;
    };
    let Some(proto) = RULE_PROTO.get(bank * 256 + key.proto as u32) else {
        return 0;
    };
    let Some(dport) = RULE_DPORT.get(bank * 65536 + dport) else {
        return 0;
    };
    let Some(dscp) = RULE_DSCP.get(bank * 64 + dscp) else {
        return 0;
    };
    first_match(bank, src, dst, proto, dport, dscp)
}

#[inline(always)]
fn first_match(
    bank: u32,
    src: &RuleSet,
    dst: &RuleSet,
    proto: &RuleSet,
    dport: &RuleSet,
    dscp: &RuleSet,
) -> RuleAction {
    for w in 0..RULE_WORDS {
        let hits = src[w] & dst[w] & proto[w] & dport[w] & dscp[w];
        if hits != 0 {
            let rule = (w as u32) * 64 + lowest_bit(hits);
            return RULE_ACTION
                .get(bank * MAX_RULES + rule)
                .copied()
                .unwrap_or(0);
        }
    }
    0
}

/// The index of the lowest set bit of `m` (not 0), by halving. (LLVM
/// turns the branch-free forms into a table lookup, which BPF would need
/// a map for.)
#[inline(always)]
fn lowest_bit(m: u64) -> u32 {
    let mut x = m;
    let mut n = 0;
    if x & 0xffff_ffff == 0 {
        n += 32;
        x >>= 32;
    }
    if x & 0xffff == 0 {
        n += 16;
        x >>= 16;
    }
    if x & 0xff == 0 {
        n += 8;
        x >>= 8;
    }
    if x & 0xf == 0 {
        n += 4;
        x >>= 4;
    }
    if x & 0x3 == 0 {
        n += 2;
        x >>= 2;
    }
    if x & 0x1 == 0 {
        n += 1;
    }
    n
}
