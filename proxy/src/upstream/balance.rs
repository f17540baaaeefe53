//! Picks an endpoint of a cluster: LEAST_REQUEST (power of two choices, Istio's
//! default), ROUND_ROBIN, RANDOM or consistent hashing (rendezvous), skipping
//! endpoints that outlier detection ejected and, on a retry, the one just tried.

use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::snapshot::{Cluster, Endpoint, LoadBalancer};

/// Picks an endpoint, or `None` when the cluster has no healthy one (503 UH).
/// `hash` is the request's consistent-hash key, when the policy has one;
/// `avoid` is the endpoint of the previous try.
pub fn pick(cluster: &Cluster, hash: Option<u64>, avoid: Option<SocketAddr>) -> Option<Arc<Endpoint>> {
    pick_avoiding(cluster, hash, avoid.as_slice())
}

/// Like [`pick`], avoiding every endpoint in `tried` (Istio's
/// `retryIgnorePreviousHosts`) while another healthy one is left.
pub fn pick_avoiding(cluster: &Cluster, hash: Option<u64>, tried: &[SocketAddr]) -> Option<Arc<Endpoint>> {
    let eps = &cluster.endpoints;
    let n = eps.len();
    if n == 0 {
        return None;
    }
    let usable = |e: &Endpoint| !e.state.is_ejected();
    let preferred = |e: &Endpoint| usable(e) && !tried.contains(&e.addr);
    let start = match (&cluster.policy.load_balancer, hash) {
        (LoadBalancer::ConsistentHash(_), Some(h)) => {
            return rendezvous(eps, h, &preferred).or_else(|| rendezvous(eps, h, &usable));
        }
        (LoadBalancer::RoundRobin, _) => cluster.rr_cursor.fetch_add(1, Ordering::Relaxed) as usize % n,
        (LoadBalancer::LeastRequest, _) if n > 1 => {
            let a = rand::random_range(0..n);
            let b = (a + rand::random_range(1..n)) % n;
            let load = |i: usize| eps[i].state.active.load(Ordering::Relaxed);
            if load(b) < load(a) { b } else { a }
        }
        _ => rand::random_range(0..n),
    };
    scan(eps, start, &preferred).or_else(|| scan(eps, start, &usable))
}

/// The first endpoint from `start` on (wrapping) that passes `ok`.
fn scan(eps: &[Arc<Endpoint>], start: usize, ok: &dyn Fn(&Endpoint) -> bool) -> Option<Arc<Endpoint>> {
    (0..eps.len()).map(|i| &eps[(start + i) % eps.len()]).find(|e| ok(e)).cloned()
}

/// Highest-random-weight hashing: each key keeps its endpoint while that endpoint
/// stays, and only the keys of a removed endpoint move.
fn rendezvous(eps: &[Arc<Endpoint>], key: u64, ok: &dyn Fn(&Endpoint) -> bool) -> Option<Arc<Endpoint>> {
    eps.iter().filter(|e| ok(e)).max_by_key(|e| hash_of(&(key, e.addr))).cloned()
}

/// A stable 64-bit hash (same across processes, unlike `RandomState`).
pub fn hash_of<T: std::hash::Hash>(value: &T) -> u64 {
    StableHasher.hash_one(value)
}

/// FNV-1a: stable, fast on short keys.
#[derive(Debug, Clone, Copy, Default)]
struct StableHasher;

#[derive(Debug)]
struct Fnv(u64);

impl BuildHasher for StableHasher {
    type Hasher = Fnv;
    fn build_hasher(&self) -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        // Final avalanche (splitmix64) so low bits are usable with `%`.
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{EndpointRegistry, HashKey, ServiceInfo, TrafficPolicy};
    use std::sync::atomic::AtomicU64;

    fn cluster(n: u16, load_balancer: LoadBalancer, registry: &EndpointRegistry) -> Cluster {
        let service = Arc::new(ServiceInfo {
            host: "payment.default.svc.cluster.local".into(),
            name: "payment".into(),
            namespace: "default".into(),
            ports: vec![],
            addresses: Vec::new(),
        });
        let endpoints = (0..n)
            .map(|i| {
                let addr = SocketAddr::from(([127, 0, 0, 1], 9000 + i));
                Arc::new(Endpoint {
                    addr,
                    labels: vec![],
                    workload: format!("payment-{i}"),
                    namespace: "default".into(),
                    service_account: None,
                    state: registry.get_or_create(addr),
                })
            })
            .collect();
        Cluster {
            name: "outbound|8080||payment.default.svc.cluster.local".into(),
            service,
            subset: None,
            port: 8080,
            endpoints,
            policy: TrafficPolicy { load_balancer, ..TrafficPolicy::default() },
            rr_cursor: AtomicU64::new(0),
        }
    }

    #[test]
    fn retries_avoid_every_endpoint_tried_while_another_is_left() {
        let registry = EndpointRegistry::default();
        for lb in [
            LoadBalancer::LeastRequest,
            LoadBalancer::RoundRobin,
            LoadBalancer::Random,
            LoadBalancer::ConsistentHash(HashKey::SourceIp),
        ] {
            let c = cluster(3, lb.clone(), &registry);
            let tried = [c.endpoints[0].addr, c.endpoints[1].addr];
            for _ in 0..100 {
                let picked = pick_avoiding(&c, Some(7), &tried).expect("one is left");
                assert_eq!(picked.addr, c.endpoints[2].addr, "{lb:?}");
            }
            // Every endpoint tried: a usable one rather than none.
            let all: Vec<SocketAddr> = c.endpoints.iter().map(|e| e.addr).collect();
            assert!(pick_avoiding(&c, Some(7), &all).is_some(), "{lb:?}");
        }
    }
}
