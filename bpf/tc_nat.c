// kproxyd external frontends (IPv4 and IPv6): node ports, external IPs and load-balancer IPs arriving from the
// network, translated at tc ingress of the node's interfaces with a BPF connection table (no netfilter involved).
// externalTrafficPolicy Cluster (F_SNAT): DNAT to any endpoint and SNAT to the node address of the interface
// towards it; the packets of such a flow, both ways, are redirected (bpf_redirect_neigh) past the IP stack.
// Local: DNAT only, the client address is kept; the stack routes it, and the reply is translated back at tc
// egress. Compiled by bcc; the loader substitutes the pin directory. Maps are pinned: a restart keeps flows.
// The frontend and slot maps have bpf/sock_lb.c's layout (the loader writes both alike): 16-byte addresses,
// IPv4 ones IPv4-mapped (::ffff:a.b.c.d); every address here is held so (connection table, interface addresses,
// pod sources): only parsing, the header rewrite and the route lookup look at a packet's family.
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#include "lb_common.h"  // F_NO_ENDPOINTS is never written here (those frontends stay with nftables); Maglev
                        // hashes the client address and port
#define F_SNAT 4  // externalTrafficPolicy Cluster: masquerade to the node's address
#define F_POD_SOURCES 8  // leave new flows from pod sources to the stack (plan.py's short_circuit_local_sources)

#define R_INGRESS 1  // reverse entry of a masqueraded flow: the reply comes to the node, translate at ingress
#define N_CLOSING 8  // a FIN or RST went this way: the entry expires soon (F_SNAT is 4)
// Idle lifetimes of a flow's entries, as conntrack's (established TCP as Cilium's, closing as TIME_WAIT's):
// an expired entry's 4-tuple or masquerade port may be taken by a new flow.
#define TCP_LIFETIME_NS (21600ULL * 1000000000ULL)
#define UDP_LIFETIME_NS (60ULL * 1000000000ULL)
#define CLOSING_LIFETIME_NS (120ULL * 1000000000ULL)
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10
// Masquerade ports: below Linux's ephemeral range (32768-60999), where the node's own connections (to the same
// pods, e.g. kubelet probes from the bridge address) take theirs, and below the node-port range (30000-32767).
// A port stays taken while its flow's entries live (120 s after a FIN, as conntrack's TIME_WAIT): 28976 ports
// carry about 240 new connections a second per backend.
#define SNAT_PORT_MIN 1024
#define SNAT_PORTS 28976
#define SNAT_TRIES 16

#define AF_INET 2
#define AF_INET6 10

// A packet's addresses and ports as it travels (network order; IPv4 addresses IPv4-mapped).
struct flow {
    u32 saddr[4];
    u32 daddr[4];
    u16 sport;
    u16 dport;
    u8 proto;
    u8 pad[3];
};

struct nat {
    struct flow to;  // what the packet's addresses and ports become (to.proto unused)
    u32 flags;
    u64 seen_ns;  // the last packet this way
};

struct affinity_key {
    u32 client[4];
    struct frontend_key frontend;
};

BPF_TABLE_PINNED("hash", struct frontend_key, struct frontend, frontends, 131072, "PIN_DIR/tc_frontends", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct slot_key, struct backend, slots, 262144, "PIN_DIR/tc_slots", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("percpu_hash", struct frontend_key, struct counter, counters, 131072, "PIN_DIR/tc_counters",
                 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct frontend_key, struct service_name, names, 131072, "PIN_DIR/tc_names",
                 BPF_F_NO_PREALLOC);
// The connection table: original direction (client -> frontend) and reply direction (backend -> node/client).
BPF_TABLE_PINNED("lru_hash", struct flow, struct nat, conns, 262144, "PIN_DIR/tc_conns", 0);
BPF_TABLE_PINNED("lru_hash", struct flow, struct nat, replies, 262144, "PIN_DIR/tc_replies", 0);
BPF_TABLE_PINNED("lru_hash", struct affinity_key, struct affinity_value, affinity, 65536, "PIN_DIR/tc_affinity", 0);
// (ifindex, 4 or 6) -> the interface's address of that family: the masquerade source towards that interface.
struct ifaddr_key {
    u32 ifindex;
    u32 family;
};
struct ifaddr {
    u32 addr[4];  // network order; IPv4 IPv4-mapped
};
BPF_TABLE_PINNED("hash", struct ifaddr_key, struct ifaddr, ifaddrs, 4096, "PIN_DIR/tc_ifaddrs",
                 BPF_F_NO_PREALLOC);
// Pod sources (kube-proxy's local-traffic detector): their new flows to an externalTrafficPolicy Local
// frontend are left to the nftables fallback, which sends pod traffic to every endpoint as kube-proxy does.
struct source_prefix {
    u32 prefixlen;  // an IPv4 prefix as its IPv4-mapped one: 96 + its length
    u32 addr[4];    // network order
};
BPF_TABLE_PINNED("lpm_trie", struct source_prefix, u8, pod_sources, 256, "PIN_DIR/tc_pod_sources",
                 BPF_F_NO_PREALLOC);

// bcc 0.26 declares this helper with three arguments; the kernel's has four (params, plen, flags).
static long (*redirect_neigh)(u32 ifindex, void *params, int plen, u64 flags) = (void *)BPF_FUNC_redirect_neigh;

struct packet {
    struct flow flow;
    u32 l3;  // offset of the IP header
    u32 l4;  // offset of the TCP/UDP header
    u8 v6;   // an IPv6 packet
    u8 tcp_flags;
};

// The IPv4 header: addresses (IPv4-mapped), protocol, where L4 starts. -1: a fragment (later ones have no ports).
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct packet *p) {
    struct iphdr ip;
    if (bpf_skb_load_bytes(skb, p->l3, &ip, sizeof(ip)) < 0 || (ip.frag_off & __constant_htons(0x3fff)))
        return -1;
    p->flow.saddr[2] = p->flow.daddr[2] = V4_MAPPED;
    p->flow.saddr[3] = ip.saddr;
    p->flow.daddr[3] = ip.daddr;
    p->flow.proto = ip.protocol;
    p->l4 = p->l3 + ip.ihl * 4;
    return 0;
}

// The IPv6 header. Extension headers are not walked: a packet with any (a fragment header included) has a
// next header other than TCP or UDP and is left to the stack, i.e. to the nftables fallback.
static __always_inline int parse_ipv6(struct __sk_buff *skb, struct packet *p) {
    struct ipv6hdr ip;
    if (bpf_skb_load_bytes(skb, p->l3, &ip, sizeof(ip)) < 0)
        return -1;
    __builtin_memcpy(p->flow.saddr, &ip.saddr, sizeof(p->flow.saddr));
    __builtin_memcpy(p->flow.daddr, &ip.daddr, sizeof(p->flow.daddr));
    p->flow.proto = ip.nexthdr;
    p->l4 = p->l3 + sizeof(ip);
    p->v6 = 1;
    return 0;
}

// 0: an IPv4 or IPv6 TCP/UDP packet with ports, parsed into p; -1: something else (left alone).
static __always_inline int parse(struct __sk_buff *skb, struct packet *p) {
    __builtin_memset(p, 0, sizeof(*p));
    p->l3 = ETH_HLEN;
    int parsed = skb->protocol == __constant_htons(ETH_P_IP)     ? parse_ipv4(skb, p)
                 : skb->protocol == __constant_htons(ETH_P_IPV6) ? parse_ipv6(skb, p)
                                                                 : -1;
    if (parsed < 0 || (p->flow.proto != IPPROTO_TCP && p->flow.proto != IPPROTO_UDP))
        return -1;
    u16 ports[2];
    if (bpf_skb_load_bytes(skb, p->l4, ports, sizeof(ports)) < 0)
        return -1;
    p->flow.sport = ports[0];
    p->flow.dport = ports[1];
    if (p->flow.proto == IPPROTO_TCP && bpf_skb_load_bytes(skb, p->l4 + 13, &p->tcp_flags, 1) < 0)
        return -1;
    return 0;
}

static __always_inline int expired(struct nat *n, u8 proto, u64 now) {
    u64 lifetime = n->flags & N_CLOSING ? CLOSING_LIFETIME_NS
                   : proto == IPPROTO_TCP ? TCP_LIFETIME_NS : UDP_LIFETIME_NS;
    return now - n->seen_ns > lifetime;
}

// A packet of a known flow went by: note when, and whether it closes the flow.
static __always_inline void seen(struct nat *n, struct packet *p) {
    n->seen_ns = bpf_ktime_get_ns();
    if (p->tcp_flags & (TCP_FIN | TCP_RST))
        n->flags |= N_CLOSING;
}

// The connection-table key of the flow a reply entry belongs to (client -> frontend).
static __always_inline void original_of(struct nat *rev, u8 proto, struct flow *out) {
    __builtin_memset(out, 0, sizeof(*out));
    __builtin_memcpy(out->saddr, rev->to.daddr, sizeof(out->saddr));
    __builtin_memcpy(out->daddr, rev->to.saddr, sizeof(out->daddr));
    out->sport = rev->to.dport;
    out->dport = rev->to.sport;
    out->proto = proto;
}

// Claim a reply entry (BPF_NOEXIST), taking over an expired one (and dropping its flow's entry). 1: claimed.
static __always_inline int claim(struct flow *reply, struct nat *rev, u64 now) {
    if (replies.insert(reply, rev) == 0)
        return 1;
    struct nat *old = replies.lookup(reply);
    if (!old || !expired(old, reply->proto, now))
        return 0;
    struct flow original;
    original_of(old, reply->proto, &original);
    conns.delete(&original);
    replies.delete(reply);
    return replies.insert(reply, rev) == 0;
}

// One address in the IP header at off (IPv4: its 4 bytes, the mapped address's last word; IPv6: all 16),
// word by word: the L4 checksum covers it through the pseudo header; only IPv4 has a header checksum.
static __always_inline void rewrite_addr(struct __sk_buff *skb, struct packet *p, u32 off, u32 *old, u32 *new,
                                         u32 csum) {
    u64 flags = BPF_F_PSEUDO_HDR | sizeof(u32) | (p->flow.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0);
    int first = p->v6 ? 0 : 3;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (i < first || old[i] == new[i])
            continue;
        bpf_l4_csum_replace(skb, p->l4 + csum, old[i], new[i], flags);
        if (!p->v6)
            bpf_l3_csum_replace(skb, p->l3 + offsetof(struct iphdr, check), old[i], new[i], sizeof(u32));
        bpf_skb_store_bytes(skb, p->l3 + off + (i - first) * sizeof(u32), &new[i], sizeof(u32), 0);
    }
}

static __always_inline void rewrite_port(struct __sk_buff *skb, struct packet *p, u32 off, u16 old, u16 new,
                                         u32 csum) {
    if (old == new)
        return;
    u64 flags = sizeof(new) | (p->flow.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0);
    bpf_l4_csum_replace(skb, p->l4 + csum, old, new, flags);
    bpf_skb_store_bytes(skb, p->l4 + off, &new, sizeof(new), 0);
}

static __always_inline void rewrite(struct __sk_buff *skb, struct packet *p, struct flow *to) {
    u32 csum = p->flow.proto == IPPROTO_TCP ? 16 : 6;  // the checksum's offset in the TCP / UDP header
    u32 saddr = p->v6 ? offsetof(struct ipv6hdr, saddr) : offsetof(struct iphdr, saddr);
    u32 daddr = p->v6 ? offsetof(struct ipv6hdr, daddr) : offsetof(struct iphdr, daddr);
    rewrite_addr(skb, p, saddr, p->flow.saddr, to->saddr, csum);
    rewrite_addr(skb, p, daddr, p->flow.daddr, to->daddr, csum);
    rewrite_port(skb, p, 0, p->flow.sport, to->sport, csum);
    rewrite_port(skb, p, 2, p->flow.dport, to->dport, csum);
}

// The interface the kernel would send a packet of p's family to daddr on (0: none, or a local address).
static __always_inline u32 route(struct __sk_buff *skb, struct packet *p, u32 *saddr, u32 *daddr,
                                 struct bpf_fib_lookup *fib) {
    __builtin_memset(fib, 0, sizeof(*fib));
    if (p->v6) {
        fib->family = AF_INET6;
        __builtin_memcpy(fib->ipv6_src, saddr, sizeof(fib->ipv6_src));
        __builtin_memcpy(fib->ipv6_dst, daddr, sizeof(fib->ipv6_dst));
    } else {
        fib->family = AF_INET;
        fib->ipv4_src = saddr[3];
        fib->ipv4_dst = daddr[3];
    }
    fib->ifindex = skb->ingress_ifindex;
    int rc = bpf_fib_lookup(skb, fib, sizeof(*fib), BPF_FIB_LOOKUP_DIRECT);
    return rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH ? fib->ifindex : 0;
}

// Send a translated packet on past the IP stack (its source may be one of the node's own addresses, which
// the stack would drop as martian); the stack's own path when there is no route.
static __always_inline int forward(struct __sk_buff *skb, struct packet *p, struct flow *to) {
    struct bpf_fib_lookup fib;
    u32 ifindex = route(skb, p, to->saddr, to->daddr, &fib);
    return ifindex ? redirect_neigh(ifindex, 0, 0, 0) : TC_ACT_OK;
}

static __always_inline u32 pick_slot(struct packet *p, struct frontend *fe) {
    if (!(fe->flags & F_MAGLEV))
        return bpf_get_prandom_u32() % fe->count;
    u32 *s = p->flow.saddr;
    u64 key = ((u64)(s[0] ^ s[1] ^ s[2] ^ s[3]) << 16) | p->flow.sport;
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdULL;
    key ^= key >> 33;
    return (u32)key % fe->count;
}

static __always_inline int same_backend(struct backend *a, struct backend *b) {
    return a->addr[0] == b->addr[0] && a->addr[1] == b->addr[1] && a->addr[2] == b->addr[2] &&
           a->addr[3] == b->addr[3] && a->port == b->port;
}

static __always_inline struct backend *affine(struct affinity_key *ak, struct frontend *fe) {
    struct affinity_value *seen = affinity.lookup(ak);
    if (!seen || bpf_ktime_get_ns() - seen->seen_ns > (u64)fe->affinity * 1000000000ULL)
        return 0;
    for (u32 i = 0; i < 64 && i < fe->count; i++) {  // still an endpoint?
        struct slot_key sk = {.rev = fe->rev, .slot = i};
        struct backend *be = slots.lookup(&sk);
        if (be && same_backend(be, &seen->backend)) {
            seen->seen_ns = bpf_ktime_get_ns();
            return be;
        }
    }
    return 0;
}

static __always_inline struct backend *pick(struct packet *p, struct frontend_key *fk, struct frontend *fe) {
    struct affinity_key ak;
    __builtin_memset(&ak, 0, sizeof(ak));
    __builtin_memcpy(ak.client, p->flow.saddr, sizeof(ak.client));
    ak.frontend = *fk;
    struct backend *be = fe->affinity ? affine(&ak, fe) : 0;
    if (be)
        return be;
    struct slot_key sk = {.rev = fe->rev, .slot = pick_slot(p, fe)};
    be = slots.lookup(&sk);
    if (be && fe->affinity) {
        struct affinity_value av = {.backend = *be, .seen_ns = bpf_ktime_get_ns()};
        affinity.update(&ak, &av);
    }
    return be;
}

// Masquerade: the address of the interface towards the backend (else the one the packet came in on) and a
// free port; the reply entry is claimed atomically (BPF_NOEXIST). 0: no address or no free port found.
static __always_inline int masquerade(struct __sk_buff *skb, struct packet *p, struct nat *fwd,
                                      struct nat *rev) {
    struct bpf_fib_lookup fib;
    struct ifaddr_key k = {.ifindex = route(skb, p, p->flow.saddr, fwd->to.daddr, &fib),
                           .family = p->v6 ? 6 : 4};
    struct ifaddr *addr = k.ifindex ? ifaddrs.lookup(&k) : 0;
    if (!addr) {
        k.ifindex = skb->ingress_ifindex;
        addr = ifaddrs.lookup(&k);
    }
    if (!addr)
        return 0;
    __builtin_memcpy(fwd->to.saddr, addr->addr, sizeof(fwd->to.saddr));
    struct flow reply = {.sport = fwd->to.dport, .proto = p->flow.proto};
    __builtin_memcpy(reply.saddr, fwd->to.daddr, sizeof(reply.saddr));
    __builtin_memcpy(reply.daddr, addr->addr, sizeof(reply.daddr));
    u64 now = bpf_ktime_get_ns();
    for (int i = 0; i < SNAT_TRIES; i++) {
        u16 port = SNAT_PORT_MIN + bpf_get_prandom_u32() % SNAT_PORTS;
        reply.dport = __builtin_bswap16(port);
        if (claim(&reply, rev, now)) {  // a port no live flow to this backend holds
            fwd->to.sport = reply.dport;
            return 1;
        }
    }
    return 0;
}

// A new flow to a frontend: pick a backend, record both directions. 0: not ours (or nothing to pick); -1: no
// free masquerade port (drop it, as nf_nat does: the client retransmits).
static __always_inline int new_flow(struct __sk_buff *skb, struct packet *p, struct nat *fwd) {
    struct frontend_key fk = {.port = p->flow.dport, .proto = p->flow.proto};
    __builtin_memcpy(fk.addr, p->flow.daddr, sizeof(fk.addr));
    struct frontend *fe = frontends.lookup(&fk);
    if (!fe || (fe->flags & F_NO_ENDPOINTS) || fe->count == 0)
        return 0;
    struct source_prefix source = {.prefixlen = 128};
    __builtin_memcpy(source.addr, p->flow.saddr, sizeof(source.addr));
    if ((fe->flags & F_POD_SOURCES) && pod_sources.lookup(&source))
        return 0;
    struct backend *be = pick(p, &fk, fe);
    if (!be)
        return 0;
    __builtin_memset(fwd, 0, sizeof(*fwd));
    fwd->to = p->flow;
    __builtin_memcpy(fwd->to.daddr, be->addr, sizeof(fwd->to.daddr));
    fwd->to.dport = be->port;
    fwd->seen_ns = bpf_ktime_get_ns();
    struct nat rev = {.to = {.sport = fk.port, .dport = p->flow.sport}, .seen_ns = fwd->seen_ns};
    __builtin_memcpy(rev.to.saddr, p->flow.daddr, sizeof(rev.to.saddr));
    __builtin_memcpy(rev.to.daddr, p->flow.saddr, sizeof(rev.to.daddr));
    if (fe->flags & F_SNAT) {
        fwd->flags = F_SNAT;
        rev.flags = R_INGRESS;
        if (!masquerade(skb, p, fwd, &rev))
            return -1;
    } else {
        struct flow reply = {.sport = be->port, .dport = p->flow.sport, .proto = p->flow.proto};
        __builtin_memcpy(reply.saddr, be->addr, sizeof(reply.saddr));
        __builtin_memcpy(reply.daddr, p->flow.saddr, sizeof(reply.daddr));
        replies.update(&reply, &rev);
    }
    conns.update(&p->flow, fwd);
    struct counter zero = {};
    struct counter *c = counters.lookup_or_try_init(&fk, &zero);
    if (c)
        c->connections++;
    return 1;
}

int tc_ingress(struct __sk_buff *skb) {
    struct packet p;
    if (parse(skb, &p) < 0)
        return TC_ACT_OK;
    struct nat *rev = replies.lookup(&p.flow);
    if (rev) {
        if (!(rev->flags & R_INGRESS))
            return TC_ACT_OK;  // a reply the stack routes: translated at egress
        seen(rev, &p);
        struct flow to = rev->to;
        rewrite(skb, &p, &to);
        return forward(skb, &p, &to);
    }
    struct nat fwd;
    struct nat *known = conns.lookup(&p.flow);
    // A SYN after a FIN or RST: the client reused its port for a new connection, which picks afresh (a SYN
    // retransmitted during the handshake keeps its backend). The old reply entry stays until it expires: its
    // masquerade port is not reused while the backend may hold the old connection in TIME_WAIT.
    int reopened = (p.tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN && known && (known->flags & N_CLOSING);
    if (known && (reopened || expired(known, p.flow.proto, bpf_ktime_get_ns()))) {
        conns.delete(&p.flow);
        known = 0;
    }
    if (known) {
        seen(known, &p);
        fwd = *known;
    } else {
        int created = new_flow(skb, &p, &fwd);
        if (created <= 0)
            return created < 0 ? TC_ACT_SHOT : TC_ACT_OK;
    }
    rewrite(skb, &p, &fwd.to);
    return fwd.flags & F_SNAT ? forward(skb, &p, &fwd.to) : TC_ACT_OK;
}

int tc_egress(struct __sk_buff *skb) {
    struct packet p;
    if (parse(skb, &p) < 0)
        return TC_ACT_OK;
    struct nat *rev = replies.lookup(&p.flow);
    if (rev && !(rev->flags & R_INGRESS)) {
        seen(rev, &p);
        struct flow to = rev->to;
        rewrite(skb, &p, &to);
    }
    return TC_ACT_OK;
}
