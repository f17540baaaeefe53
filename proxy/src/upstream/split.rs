//! Picks a route's destination by weight.
//!
//! The default is exact: a shared counter walks a low-discrepancy sequence over the
//! reduced weights, so each destination gets exactly its share in every period
//! (20 requests at 95/5) with one atomic add and no lock. `Random` draws per
//! request like Envoy; a hash key (consistent hashing) keeps a user on one
//! destination for as long as the weights hold.

use std::sync::atomic::Ordering;

use crate::snapshot::{RouteDestination, WeightedDestinations};

/// How destinations are picked when no hash key applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitMode {
    /// Exact shares (smooth, like nginx and haproxy's weighted round robin).
    #[default]
    Exact,
    /// A random draw per request (Envoy's behaviour).
    Random,
}

/// Picks a destination. `hash` (from a consistent-hash key) pins the choice.
pub fn pick(dests: &WeightedDestinations, mode: SplitMode, hash: Option<u64>) -> &RouteDestination {
    if dests.destinations.len() == 1 {
        return &dests.destinations[0];
    }
    let slot = match (hash, mode) {
        (Some(h), _) => h % dests.total,
        (None, SplitMode::Random) => rand::random::<u64>() % dests.total,
        (None, SplitMode::Exact) => {
            let n = dests.counter.fetch_add(1, Ordering::Relaxed) % dests.total;
            // n * stride < total^2 can overflow for huge totals: widen.
            ((u128::from(n) * u128::from(dests.stride)) % u128::from(dests.total)) as u64
        }
    };
    let index = dests.cumulative.partition_point(|&end| end <= slot);
    &dests.destinations[index.min(dests.destinations.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Cluster, HeaderOps, ServiceInfo, TrafficPolicy};
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    fn dests(weights: &[u32]) -> WeightedDestinations {
        let service = Arc::new(ServiceInfo {
            host: "payment.default.svc.cluster.local".into(),
            name: "payment".into(),
            namespace: "default".into(),
            ports: vec![],
            addresses: Vec::new(),
        });
        let list = weights
            .iter()
            .enumerate()
            .map(|(i, w)| RouteDestination {
                cluster: Arc::new(Cluster {
                    name: format!("c{i}"),
                    service: service.clone(),
                    subset: Some(format!("v{i}")),
                    port: 80,
                    endpoints: vec![],
                    policy: TrafficPolicy::default(),
                    rr_cursor: AtomicU64::new(0),
                }),
                weight: *w,
                headers: HeaderOps::default(),
            })
            .collect();
        WeightedDestinations::new(list).expect("weights")
    }

    fn shares(d: &WeightedDestinations, n: usize, mode: SplitMode) -> Vec<usize> {
        let mut counts = vec![0; d.destinations.len()];
        for _ in 0..n {
            let picked = pick(d, mode, None);
            let i = d.destinations.iter().position(|x| std::ptr::eq(x, picked)).expect("member");
            counts[i] += 1;
        }
        counts
    }

    #[test]
    fn exact_95_5_is_exact_in_every_window() {
        let d = dests(&[95, 5]);
        assert_eq!(d.total, 20);
        // Any 20 consecutive picks hold exactly one v2.
        for _ in 0..50 {
            assert_eq!(shares(&d, 20, SplitMode::Exact), vec![19, 1]);
        }
        let counts = shares(&d, 100_000, SplitMode::Exact);
        assert_eq!(counts[1], 5_000);
    }

    #[test]
    fn relative_weights_and_fine_canaries() {
        let d = dests(&[999, 1]);
        assert_eq!(shares(&d, 100_000, SplitMode::Exact)[1], 100);
        let d = dests(&[1, 1, 2]);
        assert_eq!(shares(&d, 4_000, SplitMode::Exact), vec![1_000, 1_000, 2_000]);
        let d = dests(&[7, 0, 3]);
        assert_eq!(d.destinations.len(), 2);
        assert_eq!(shares(&d, 1_000, SplitMode::Exact), vec![700, 300]);
    }

    #[test]
    fn zero_weights_only_is_none() {
        let service = dests(&[1]);
        assert_eq!(service.destinations.len(), 1);
        assert!(WeightedDestinations::new(Vec::new()).is_none());
    }

    #[test]
    fn a_new_split_starts_anywhere_in_its_period() {
        // Each reload compiles new splits: their first picks must not all land on
        // the same slot, or short runs between reloads skew the shares.
        let v2 = (0..4_000).filter(|_| shares(&dests(&[95, 5]), 1, SplitMode::Exact)[1] == 1).count();
        // Binomial(4000, 0.05): mean 200, sigma ≈ 13.8; 6 sigma ≈ 83.
        assert!((117..=283).contains(&v2), "v2 first in {v2} of 4000 new splits");
    }

    #[test]
    fn random_is_close() {
        let d = dests(&[95, 5]);
        let v2 = shares(&d, 100_000, SplitMode::Random)[1] as f64 / 100_000.0;
        // 10 standard deviations of a binomial at p = 0.05, n = 100k: never flaky.
        assert!((v2 - 0.05).abs() < 0.007, "share {v2}");
    }

    #[test]
    fn hash_pins_the_choice() {
        let d = dests(&[50, 50]);
        let first = pick(&d, SplitMode::Exact, Some(12345)) as *const _;
        for _ in 0..100 {
            assert!(std::ptr::eq(pick(&d, SplitMode::Exact, Some(12345)), first));
        }
    }
}
