//! The tokio runtime a command runs on: the data-plane roles (sidecar, gateway)
//! size theirs by `--concurrency`, like Envoy's worker count.

use std::io;

/// Builds the runtime for `concurrency` worker threads; 0 means one per core the
/// process may use (`available_parallelism`: its CPU affinity, so `taskset` and
/// cpusets count, and its cgroup CPU quota).
///
/// One worker gets a current-thread runtime: every task, timer and socket is
/// driven by the thread that runs `block_on`, so a wake-up is a queue push with
/// no other thread to notify and no work stealing. More get the multi-thread
/// runtime with that many workers.
pub fn build(concurrency: usize) -> io::Result<tokio::runtime::Runtime> {
    match workers(concurrency) {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    }
}

/// The worker count `concurrency` stands for.
pub fn workers(concurrency: usize) -> usize {
    if concurrency > 0 {
        return concurrency;
    }
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_concurrency_wins() {
        assert_eq!(workers(3), 3);
        assert_eq!(workers(1), 1);
    }

    #[test]
    fn zero_means_the_cores_we_may_use() {
        assert!(workers(0) >= 1);
    }

    #[test]
    fn one_worker_is_a_current_thread_runtime() {
        let rt = build(1).expect("runtime");
        assert_eq!(rt.handle().runtime_flavor(), tokio::runtime::RuntimeFlavor::CurrentThread);
        let rt = build(2).expect("runtime");
        assert_eq!(rt.handle().runtime_flavor(), tokio::runtime::RuntimeFlavor::MultiThread);
        assert_eq!(rt.block_on(async { 1 + 1 }), 2);
    }
}
