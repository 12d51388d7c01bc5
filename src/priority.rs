//! CPU priorities of the gateway's background threads. The MLLP connections run at the
//! default priority: every microsecond of CPU they wait for is ACK latency. The threads
//! that work behind them (the journal's writer, the pipeline) run at a lower one, so that
//! on a busy machine the scheduler lets an ACK go first, and get all of an idle core.

/// Sets the calling thread's nice value (Linux; threads it starts afterwards inherit it).
/// Where the OS refuses, or elsewhere than Linux, `thread` runs at normal priority.
pub fn lower(nice: i32, thread: &str) {
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice) {
        tracing::warn!(error = %error, thread, "cannot lower the thread's CPU priority");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (nice, thread);
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn the_calling_thread_alone_is_lowered() {
        let before = rustix::process::getpriority_process(None).unwrap();
        let inside = std::thread::spawn(|| {
            super::lower(7, "test");
            rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
        })
        .join()
        .unwrap();
        if before <= 7 {
            // (Raising a priority needs privileges: a test run already below 7 stays there.)
            assert_eq!(inside, 7);
        }
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), before);
    }
}
