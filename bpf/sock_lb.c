// kproxyd socket load balancer (IPv4): a Service frontend is translated once, at connect() or sendmsg(),
// to a backend chosen here, so the connection's packets need no NAT. Compiled by bcc at daemon start-up;
// The loader substitutes the pin directory in the map paths below. Maps are pinned so that a restarted daemon (and the programs it
// attaches in place of the old ones) keep the same state: no connection sees an empty table.
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

#define F_NO_ENDPOINTS 1  // no endpoint this traffic may use: fail connect()/sendmsg() at once (EPERM)
#define F_MAGLEV 2        // slots hold a Maglev table: pick by a hash of the socket, not at random

struct frontend_key {
    u32 addr;  // network order
    u16 port;  // network order
    u8 proto;
    u8 pad;
};

struct frontend {
    u32 rev;       // the slots this frontend uses: (rev, 0..count-1)
    u32 count;
    u32 flags;
    u32 affinity;  // sessionAffinity ClientIP timeout in seconds; 0: none
};

struct slot_key {
    u32 rev;
    u32 slot;
};

struct backend {
    u32 addr;
    u16 port;
    u16 pad;
};

struct counter {
    u64 connections;  // connect() translated
    u64 packets;      // unconnected UDP datagrams translated
};

struct affinity_key {
    u64 netns;  // the client is the socket's network namespace (a pod), as Cilium's socket LB
    u32 frontend_addr;
    u16 frontend_port;
    u8 proto;
    u8 pad;
};

struct affinity_value {
    struct backend backend;
    u64 seen_ns;
};

struct reverse_key {
    u64 cookie;
    u32 addr;
    u16 port;
    u16 pad;
};

// Hash maps allocate per element (BPF_F_NO_PREALLOC): memory follows the Services, not the limits.
BPF_TABLE_PINNED("hash", struct frontend_key, struct frontend, frontends, 131072, "PIN_DIR/frontends", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct slot_key, struct backend, slots, 262144, "PIN_DIR/slots", BPF_F_NO_PREALLOC);
// Per-CPU counters and per-CPU LRU lists: concurrent connect()s on different CPUs share no cache line or lock.
BPF_TABLE_PINNED("percpu_hash", struct frontend_key, struct counter, counters, 131072, "PIN_DIR/counters",
                 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct affinity_key, struct affinity_value, affinity, 65536, "PIN_DIR/affinity",
                 BPF_F_NO_COMMON_LRU);
BPF_TABLE_PINNED("lru_hash", struct reverse_key, struct frontend_key, reverse, 65536, "PIN_DIR/reverse",
                 BPF_F_NO_COMMON_LRU);

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
    ak->frontend_addr = fk->addr;
    ak->frontend_port = fk->port;
    ak->proto = fk->proto;
    struct affinity_value *seen = affinity.lookup(ak);
    if (!seen)
        return 0;
    if (bpf_ktime_get_ns() - seen->seen_ns > (u64)fe->affinity * 1000000000ULL)
        return 0;
    // Still an endpoint? Its slot list is short with affinity (no Maglev): check each.
    for (u32 i = 0; i < 64 && i < fe->count; i++) {
        struct slot_key sk = {.rev = fe->rev, .slot = i};
        struct backend *be = slots.lookup(&sk);
        if (be && be->addr == seen->backend.addr && be->port == seen->backend.port) {
            seen->seen_ns = bpf_ktime_get_ns();
            return be;
        }
    }
    return 0;
}

// 1: translated (ctx rewritten), 0: no frontend here (leave alone), -1: fail the call.
static __always_inline int translate(struct bpf_sock_addr *ctx, u8 proto, int connected) {
    struct frontend_key fk = {.addr = ctx->user_ip4, .port = (u16)ctx->user_port, .proto = proto};
    struct frontend *fe = frontends.lookup(&fk);
    if (!fe) {
        // A cluster IP on a port or protocol it does not serve: fail at once, as kube-proxy REJECTs it.
        struct frontend_key address = {.addr = fk.addr};
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
    struct reverse_key rk = {.cookie = bpf_get_socket_cookie(ctx), .addr = be->addr, .port = be->port};
    reverse.update(&rk, &fk);
    ctx->user_ip4 = be->addr;
    ctx->user_port = be->port;
    return 1;
}

static __always_inline u8 proto_of(struct bpf_sock_addr *ctx) {
    return ctx->type == 1 /* SOCK_STREAM */ ? IPPROTO_TCP : IPPROTO_UDP;
}

int connect4(struct bpf_sock_addr *ctx) {
    if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
        return 1;
    return translate(ctx, proto_of(ctx), 1) < 0 ? 0 : 1;
}

int sendmsg4(struct bpf_sock_addr *ctx) {
    return translate(ctx, IPPROTO_UDP, 0) < 0 ? 0 : 1;
}

// Replies and getpeername() show the Service address the application asked for, not the backend's.
static __always_inline void untranslate(struct bpf_sock_addr *ctx) {
    struct reverse_key rk = {.cookie = bpf_get_socket_cookie(ctx), .addr = ctx->user_ip4,
                             .port = (u16)ctx->user_port};
    struct frontend_key *fk = reverse.lookup(&rk);
    if (fk) {
        ctx->user_ip4 = fk->addr;
        ctx->user_port = fk->port;
    }
}

int recvmsg4(struct bpf_sock_addr *ctx) {
    untranslate(ctx);
    return 1;
}

int getpeername4(struct bpf_sock_addr *ctx) {
    untranslate(ctx);
    return 1;
}
