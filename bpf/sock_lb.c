// kproxyd socket load balancer (IPv4 and IPv6): a Service frontend is translated once, at connect() or sendmsg(),
// to a backend chosen here, so the connection's packets need no NAT. Compiled by bcc at daemon start-up;
// The loader substitutes the pin directory in the map paths below. Maps are pinned so that a restarted daemon (and the programs it
// attaches in place of the old ones) keep the same state: no connection sees an empty table.
//
// One map set serves both families: addresses are 16 bytes, IPv4 ones stored IPv4-mapped (::ffff:a.b.c.d).
// An IPv6 socket connecting to ::ffff:<cluster IP> (a dual-stack socket reaching an IPv4 Service; the kernel
// runs connect6 for it, not connect4) thus finds the IPv4 frontend and gets its backend IPv4-mapped.
// The v4 and v6 programs differ only in how they read and write the address: one set of helpers, inlined
// with a constant family flag so that the verifier never sees a user_ip6 access in a v4 program (or back).
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

#include "lb_common.h"  // F_NO_ENDPOINTS fails connect()/sendmsg() at once (EPERM); Maglev hashes the socket

struct affinity_key {
    u64 netns;  // the client is the socket's network namespace (a pod), as Cilium's socket LB
    struct frontend_key frontend;
    u32 pad;
};

struct reverse_key {
    u64 cookie;
    struct backend backend;
    u32 pad;
};

// Hash maps allocate per element (BPF_F_NO_PREALLOC): memory follows the Services, not the limits.
BPF_TABLE_PINNED("hash", struct frontend_key, struct frontend, frontends, 131072, "PIN_DIR/frontends", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct slot_key, struct backend, slots, 262144, "PIN_DIR/slots", BPF_F_NO_PREALLOC);
// Per-CPU counters and per-CPU LRU lists: concurrent connect()s on different CPUs share no cache line or lock.
BPF_TABLE_PINNED("percpu_hash", struct frontend_key, struct counter, counters, 131072, "PIN_DIR/counters",
                 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct frontend_key, struct service_name, names, 131072, "PIN_DIR/names",
                 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct affinity_key, struct affinity_value, affinity, 65536, "PIN_DIR/affinity",
                 BPF_F_NO_COMMON_LRU);
BPF_TABLE_PINNED("lru_hash", struct reverse_key, struct frontend_key, reverse, 65536, "PIN_DIR/reverse",
                 BPF_F_NO_COMMON_LRU);

// The socket address the call names (v6: the program is one of the "6" hooks; a constant once inlined).
static __always_inline void get_addr(struct bpf_sock_addr *ctx, int v6, u32 addr[4], u16 *port) {
    if (v6) {
        addr[0] = ctx->user_ip6[0];
        addr[1] = ctx->user_ip6[1];
        addr[2] = ctx->user_ip6[2];
        addr[3] = ctx->user_ip6[3];
    } else {
        addr[0] = 0;
        addr[1] = 0;
        addr[2] = V4_MAPPED;
        addr[3] = ctx->user_ip4;
    }
    *port = (u16)ctx->user_port;
}

static __always_inline void set_addr(struct bpf_sock_addr *ctx, int v6, const u32 addr[4], u16 port) {
    if (v6) {
        ctx->user_ip6[0] = addr[0];
        ctx->user_ip6[1] = addr[1];
        ctx->user_ip6[2] = addr[2];
        ctx->user_ip6[3] = addr[3];
    } else {
        ctx->user_ip4 = addr[3];
    }
    ctx->user_port = port;
}

static __always_inline int same_backend(const struct backend *a, const struct backend *b) {
    return a->addr[0] == b->addr[0] && a->addr[1] == b->addr[1] && a->addr[2] == b->addr[2] &&
           a->addr[3] == b->addr[3] && a->port == b->port;
}

static __always_inline u32 pick_slot(struct bpf_sock_addr *ctx, struct frontend *fe) {
    if (!(fe->flags & F_MAGLEV))
        return bpf_get_prandom_u32() % fe->count;
    // Maglev: the same bound source port (or socket) keeps its backend while the table barely changes.
    struct bpf_sock *sk = ctx->sk;
    u64 key = sk && sk->src_port ? sk->src_port : bpf_get_socket_cookie(ctx);
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdULL;
    key ^= key >> 33;
    return (u32)key % fe->count;
}

static __always_inline struct backend *affine(struct bpf_sock_addr *ctx, struct frontend_key *fk,
                                              struct frontend *fe, struct affinity_key *ak) {
    __builtin_memset(ak, 0, sizeof(*ak));
    ak->netns = bpf_get_netns_cookie(ctx);
    ak->frontend = *fk;
    struct affinity_value *seen = affinity.lookup(ak);
    if (!seen)
        return 0;
    if (bpf_ktime_get_ns() - seen->seen_ns > (u64)fe->affinity * 1000000000ULL)
        return 0;
    // Still an endpoint? Its slot list is short with affinity (no Maglev): check each.
    for (u32 i = 0; i < 64 && i < fe->count; i++) {
        struct slot_key sk = {.rev = fe->rev, .slot = i};
        struct backend *be = slots.lookup(&sk);
        if (be && same_backend(be, &seen->backend)) {
            seen->seen_ns = bpf_ktime_get_ns();
            return be;
        }
    }
    return 0;
}

// 1: translated (ctx rewritten), 0: no frontend here (leave alone), -1: fail the call.
static __always_inline int translate(struct bpf_sock_addr *ctx, int v6, u8 proto, int connected) {
    struct frontend_key fk = {.proto = proto};
    get_addr(ctx, v6, fk.addr, &fk.port);
    struct frontend *fe = frontends.lookup(&fk);
    if (!fe) {
        // A cluster IP on a port or protocol it does not serve: fail at once, as kube-proxy REJECTs it.
        struct frontend_key address = {};
        __builtin_memcpy(address.addr, fk.addr, sizeof(address.addr));
        return frontends.lookup(&address) ? -1 : 0;
    }
    if ((fe->flags & F_NO_ENDPOINTS) || fe->count == 0)
        return -1;
    struct affinity_key ak;
    struct backend *be = 0;
    if (fe->affinity)
        be = affine(ctx, &fk, fe, &ak);
    if (!be) {
        struct slot_key sk = {.rev = fe->rev, .slot = pick_slot(ctx, fe)};
        be = slots.lookup(&sk);
        if (!be)
            return -1;  // a slot being replaced right now: never reached, slots are written first
        if (fe->affinity) {
            struct affinity_value av = {.backend = *be, .seen_ns = bpf_ktime_get_ns()};
            affinity.update(&ak, &av);
        }
    }
    struct counter zero = {};
    struct counter *c = counters.lookup_or_try_init(&fk, &zero);
    if (c) {
        if (connected)
            c->connections++;
        else
            c->packets++;
    }
    struct reverse_key rk = {.cookie = bpf_get_socket_cookie(ctx), .backend = *be};
    reverse.update(&rk, &fk);
    set_addr(ctx, v6, be->addr, be->port);
    return 1;
}

static __always_inline int on_connect(struct bpf_sock_addr *ctx, int v6) {
    if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
        return 1;
    u8 proto = ctx->type == 1 /* SOCK_STREAM */ ? IPPROTO_TCP : IPPROTO_UDP;
    return translate(ctx, v6, proto, 1) < 0 ? 0 : 1;
}

static __always_inline int on_sendmsg(struct bpf_sock_addr *ctx, int v6) {
    return translate(ctx, v6, IPPROTO_UDP, 0) < 0 ? 0 : 1;
}

// Replies and getpeername() show the Service address the application asked for, not the backend's.
static __always_inline int untranslate(struct bpf_sock_addr *ctx, int v6) {
    struct reverse_key rk = {.cookie = bpf_get_socket_cookie(ctx)};
    get_addr(ctx, v6, rk.backend.addr, &rk.backend.port);
    struct frontend_key *fk = reverse.lookup(&rk);
    if (fk)
        set_addr(ctx, v6, fk->addr, fk->port);
    return 1;
}

int connect4(struct bpf_sock_addr *ctx) { return on_connect(ctx, 0); }
int connect6(struct bpf_sock_addr *ctx) { return on_connect(ctx, 1); }
int sendmsg4(struct bpf_sock_addr *ctx) { return on_sendmsg(ctx, 0); }
int sendmsg6(struct bpf_sock_addr *ctx) { return on_sendmsg(ctx, 1); }
int recvmsg4(struct bpf_sock_addr *ctx) { return untranslate(ctx, 0); }
int recvmsg6(struct bpf_sock_addr *ctx) { return untranslate(ctx, 1); }
int getpeername4(struct bpf_sock_addr *ctx) { return untranslate(ctx, 0); }
int getpeername6(struct bpf_sock_addr *ctx) { return untranslate(ctx, 1); }
