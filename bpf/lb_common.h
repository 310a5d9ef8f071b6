// The layout both kproxyd programs share (bpf/sock_lb.c, bpf/tc_nat.c): the daemon writes their frontend,
// slot and counter maps alike. Addresses are 16 bytes; IPv4 ones are stored IPv4-mapped (::ffff:a.b.c.d).
#ifndef KPROXYD_LB_COMMON_H
#define KPROXYD_LB_COMMON_H

#define F_NO_ENDPOINTS 1  // no endpoint this traffic may use
#define F_MAGLEV 2        // slots hold a Maglev table: pick by a hash, not at random

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define V4_MAPPED 0xffff0000U  // the third word of ::ffff:a.b.c.d, bytes 00 00 ff ff, as a host-order u32
#else
#define V4_MAPPED 0x0000ffffU
#endif

struct frontend_key {
    u32 addr[4];  // network order; IPv4 as ::ffff:a.b.c.d
    u16 port;     // network order
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
    u32 addr[4];  // the frontend's family: IPv4-mapped for an IPv4 frontend
    u16 port;
    u16 pad;
};

struct counter {
    u64 connections;  // connections (flows) translated
    u64 packets;      // unconnected UDP datagrams translated (the socket load balancer's)
};

// A frontend's ServicePort, "namespace/name:port" (at most 63 + 1 + 63 + 1 + 15 characters), for
// `kproxyd explain`: the daemon writes it next to the frontend entry; the programs never read it.
struct service_name {
    char name[144];
};

struct affinity_value {
    struct backend backend;
    u64 seen_ns;
};

#endif
